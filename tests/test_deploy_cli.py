"""Deployment commands: credentials with safe permissions, and clear failures before connecting."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from client.daemon import node_config, supernode_command
from medgan_core.config import ConnectionConfig, CoordinatorConfig, SiteConfig, load_site
from medgan_core.study_config import StudyConfig
from medgan.cli import app
from server.deploy import run_command, superlink_command

runner = CliRunner()


@pytest.fixture()
def credentials(tmp_path: Path) -> Path:
    assert runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "certs"), "--san", "coord.example.org",
                               "--san", "10.1.2.3"]).exit_code == 0
    assert runner.invoke(app, ["site", "keys", "--name", "hospital-a", "--out", str(tmp_path / "keys")]).exit_code == 0
    return tmp_path


def test_credentials_have_safe_modes_and_the_right_names(credentials: Path) -> None:
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for private in ("certs/ca.key", "certs/server.key", "keys/hospital-a"):
        assert mode(credentials / private) == 0o600
    assert mode(credentials / "certs/ca.crt") == 0o644
    cert = x509.load_pem_x509_certificate((credentials / "certs/server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the operator's names, then loopback: the coordinator's own commands reach the Control API there
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    assert (credentials / "keys/hospital-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = runner.invoke(app, ["certs", "init", "--out", str(credentials / "certs"), "--san", "x"])
    assert again.exit_code == 2 and "--force" in again.output


def _site_toml(root: Path, data: str, ca: str = "certs/ca.crt", key: str = "keys/hospital-a", name: str = "site") -> Path:
    path = root / f"{name}.toml"
    path.write_text(f'[site]\nname = "hospital-a"\ndata-path = "{data}"\nstate-dir = "state"\n'
                    f'[connection]\nsuperlink = "127.0.0.1:9092"\nca-cert = "{ca}"\nprivate-key = "{key}"\nport = 9194\n')
    return path


def test_site_start_fails_fast_with_a_clear_message(credentials: Path, tiny_sites: list[Path]) -> None:
    cases = [
        (_site_toml(credentials, "no/such/folder", name="a"), "data-path"),
        (_site_toml(credentials, str(tiny_sites[0]), ca="certs/missing.crt", name="b"),
         "does not exist; create it with 'medgan certs init'"),
        (_site_toml(credentials, str(tiny_sites[0]), key="keys/nokey", name="c"), "site private key"),
    ]
    for config, message in cases:
        result = runner.invoke(app, ["site", "start", "--config", str(config)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    broken = credentials / "broken-site"
    broken.mkdir()
    (broken / "manifest.csv").write_text("file,subject\nx.nii,s1\n")
    result = runner.invoke(app, ["site", "start", "--config", str(_site_toml(credentials, str(broken)))])
    assert result.exit_code == 2 and "missing column" in result.output
    (credentials / "keys/hospital-a").chmod(0o644)
    result = runner.invoke(app, ["site", "start", "--config", str(_site_toml(credentials, str(tiny_sites[0])))])
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_site_command_carries_the_node_config(credentials: Path, tiny_sites: list[Path]) -> None:
    site, connection = load_site(_site_toml(credentials, str(tiny_sites[0])))
    command, env = supernode_command(site, connection)
    assert command[command.index("--root-certificates") + 1] == str(credentials / "certs/ca.crt")
    assert "--insecure" not in command and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert f'data-path="{tiny_sites[0]}"' in node_config(site) and 'site-name="hospital-a"' in node_config(site)
    budget = SiteConfig(str(tiny_sites[0]), state_dir="s", epsilon_budget=2.5)
    assert "epsilon-budget=2.5" in node_config(budget) and "physical-batch" not in node_config(budget)
    assert " physical-batch=16" in node_config(dataclasses.replace(budget, physical_batch=16))
    assert " max-steps-per-round=250" in node_config(dataclasses.replace(budget, max_steps_per_round=250))
    assert " max-batch-size=64" in node_config(dataclasses.replace(budget, max_batch_size=64))
    toml = _site_toml(credentials, str(tiny_sites[0]), name="small")
    toml.write_text(toml.read_text().replace("[connection]", "physical-batch = 16\n[connection]"))
    assert load_site(toml)[0].physical_batch == 16
    toml.write_text(toml.read_text().replace("physical-batch = 16", "physical-batch = -4"))
    result = runner.invoke(app, ["site", "start", "--config", str(toml)])
    assert result.exit_code == 2 and "site physical-batch = -4; it must be >= 0" in result.output, result.output


def test_coordinator_commands_check_before_connecting(credentials: Path, tmp_path: Path) -> None:
    missing = CoordinatorConfig(certs_dir=str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match="CA certificate .* does not exist"):
        superlink_command(missing)
    coordinator = CoordinatorConfig(certs_dir=str(credentials / "certs"), database=str(tmp_path / "db" / "state.db"))
    command, env = superlink_command(coordinator)
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    run, _ = run_command(coordinator, StudyConfig(), tmp_path)
    assert run[run.index("--run-config") + 1] == str(tmp_path / "run-config.toml")
    bad_study = tmp_path / "study.toml"
    bad_study.write_text("[task]\nname = 'gan9000'\n")
    coord_file = tmp_path / "coordinator.toml"
    coord_file.write_text(f'[coordinator]\ncerts-dir = "{credentials / "certs"}"\n')
    result = runner.invoke(app, ["run", "--config", str(bad_study), "--federation", str(coord_file)])
    assert result.exit_code == 2 and "task.name = 'gan9000' is not a known task" in result.output
    result = runner.invoke(app, ["server", "register", str(tmp_path / "nokey.pub"), "--config", str(coord_file)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_example_federation_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "sites_example" / "federation"
    from medgan_core.config import load_coordinator
    from medgan_core.study_config import load_study

    coordinator = load_coordinator(root / "coordinator.toml")
    ports = set()
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        site, connection = load_site(root / f"{name}.toml")
        assert connection.superlink == coordinator.address and site.site_name == name
        ports.add(connection.port)
    assert len(ports) == 3  # distinct local ports on one host
    assert load_study(root / "study.toml").run.num_sites == 3
    assert isinstance(ConnectionConfig().port, int)
