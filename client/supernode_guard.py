"""The hospital's SuperNode, running only study apps the hospital approved.

A SuperNode runs whatever Flower App Bundle (FAB) the SuperLink hands it. Flower's own
``--trusted-entities`` accepts only apps signed through the online Flower Hub, which an
offline hospital cannot use. So the site pins app hashes instead: the SHA-256 of the
FAB, which ``flwr run`` builds reproducibly from the project's files
(``medgan app-hash`` prints it). By default a site approves exactly the app it has
installed itself; ``[site] app-hash`` in site.toml lists others it has reviewed. Any
other app — a modified study, or one submitted by someone else — is refused before a
line of it runs: the site logs one line saying why and answers the round with Flower's
"FAB could not be verified" error, so the coordinator leaves it out.

Run as ``python -m client.supernode_guard --app-hash H1,H2 -- FLOWER-SUPERNODE-ARGS``;
``client.daemon.supernode_command`` builds that command.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from medgan_core.errors import ConfigError

PIN_MARK = "medgan-app-pin"
log = logging.getLogger("medgan.site")


def app_hash(project_dir: str | Path) -> str:
    """The SHA-256 of the FAB ``flwr run APP_DIR`` would send (Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files

    project = Path(project_dir)
    try:
        parts = app_parts(project)
        if parts is None:
            return hashlib.sha256(build_fab_from_disk(project)).hexdigest()
        return hashlib.sha256(build_fab_from_files(app_files(project, parts))[0]).hexdigest()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot build the study app from {project_dir} ({exc})") from exc


def app_parts(project: Path) -> tuple[str, ...] | None:
    """The top-level folders ``[tool.flwr.app] fab-include`` draws from (None: no such key, so
    the bundle may hold any file of the project)."""
    import tomllib

    patterns = tomllib.loads((project / "pyproject.toml").read_text()).get("tool", {}).get("flwr", {}) \
        .get("app", {}).get("fab-include")
    if not patterns:
        return None
    tops = {pattern.lstrip("/").split("/", 1)[0] for pattern in patterns}
    if any(any(c in top for c in "*?[!") for top in tops):
        return None  # a pattern that may match at any depth: look everywhere
    return tuple(sorted(tops))


def app_files(project: Path, parts: Iterable[str]) -> dict[str, Path]:
    """The files Flower's builder would keep, read from ``parts`` alone rather than the whole
    checkout (whose walk, through the virtual environment, took 8 s a hash on 2 cores): the
    bundle holds only files ``fab-include`` matches, and those all lie in ``parts``."""
    from flwr.cli.utils import collect_files

    files = {name: project / name for name in ("pyproject.toml", ".gitignore") if (project / name).is_file()}
    for part in parts:
        if (project / part).is_dir():
            files.update({f"{part}/{name}": path for name, path in collect_files(project / part).items()})
        elif (project / part).is_file():
            files[part] = project / part
    return files


def check_hashes(hashes: Iterable[str]) -> tuple[str, ...]:
    out = tuple(h.strip().lower() for h in hashes if h.strip())
    bad = [h for h in out if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad or not out:
        raise ConfigError(f"app-hash {bad[:1] or '(none)'}: give the 64-hex-digit SHA-256 that 'medgan app-hash' prints")
    return out


def install(approved: Iterable[str]) -> None:
    """Wrap Flower's message pull so every new run's FAB is checked against ``approved``."""
    import flwr.supernode.start_client_internal as sci

    pins = frozenset(check_hashes(approved))
    original_pull: Callable[..., Any] = sci._pull_and_store_message

    def verify(fab: Any, trusted_entities: dict[str, str]) -> bool:
        return fab.verifications.get(PIN_MARK) == "approved"

    def guarded_pull(*args: Any, **kwargs: Any) -> Any:
        get_fab = kwargs["get_fab"]

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest in pins:
                fab.verifications = {"valid_license": "pinned", PIN_MARK: "approved"}
            else:
                log.error("refused study app %s (run %s): not an app this site approved (site.toml [site] "
                          "app-hash; this site approves %s)", digest[:12], run_id,
                          ", ".join(sorted(p[:12] for p in pins)))
                fab.verifications = {}  # Flower then answers with its "FAB could not be verified" error
            return fab

        kwargs["get_fab"] = checked_get_fab
        kwargs["trusted_entities"] = {PIN_MARK: "pinned app hashes"}  # switches Flower's verification on
        return original_pull(*args, **kwargs)

    sci._pull_and_store_message = guarded_pull  # type: ignore[assignment]
    sci._verify_fab = verify  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["--app-hash"] or len(argv) < 2:
        raise SystemExit("usage: python -m client.supernode_guard --app-hash H1[,H2] -- FLOWER-SUPERNODE-ARGS")
    hashes, argv = argv[1].split(","), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        install(hashes)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
