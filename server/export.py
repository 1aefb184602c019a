"""``medgan export``: a finished study's model as one file a hospital can apply.

The coordinator's checkpoint holds every shared array. Arrays a study kept at the sites
(local groups, FedBN's normalisation layers, site calibration) are not in it: at a site,
``--site-state`` takes that site's own (its state never leaves it), or its whole personal
model where the study fine-tuned one (``aggregation.finetune-steps``); ``--for-new-site``
keeps the coordinator's values for them (their initial values: identity normalisation
affines and calibration), for a hospital outside the study, and says so in the file.
"""

from __future__ import annotations

from pathlib import Path

from medgan_core.checkpoints import load_checkpoint
from medgan_core.errors import MedGANError
from medgan_core.model_file import save_model
from medgan_core.sharing import local_array_names
from medgan_core.site_state import SiteState
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task, geometry_words
from server.run_folder import RunFolder
from server.warm_start import initial_model_provenance


def export_model(run_dir: str | Path, out: str | Path, *, server_round: int | None = None,
                 site_state: str | Path | None = None, for_new_site: bool = False) -> Path:
    folder = RunFolder(Path(run_dir))
    trained = folder.trained_rounds()
    if not trained:
        raise MedGANError(f"{folder.root} holds no trained round to export")
    chosen = trained[-1] if server_round is None else server_round
    if chosen not in trained:
        raise MedGANError(f"round {chosen} of {folder.root} updated no model; trained rounds: "
                          f"{', '.join(map(str, trained))}")
    arrays, meta = load_checkpoint(folder.checkpoint(chosen))
    study = StudyConfig.from_dict(meta["study"], str(folder.checkpoint(chosen)))
    local = sorted(local_array_names(build_task(study.task).groups, study.aggregation))
    study_id = folder.study_id()
    saved = SiteState(site_state, study_id).latest(before=chosen + 1) if site_state else None
    own = saved.personal_for(chosen, every_round=study.aggregation.ditto_steps > 0) if saved else None
    if saved is not None and own is not None:
        arrays = dict(own)  # the site's personal model: every array its own
        layers = f"this site's personal model ({site_state}): {_personal_words(study, chosen, saved.personal_steps)}"
    elif local and site_state:
        if saved is None or set(local) - set(saved.local):
            raise MedGANError(f"{site_state} holds no site state of study {study_id} up to round {chosen}")
        arrays.update({name: saved.local[name] for name in local})
        layers = f"this site's own ({site_state}, round {saved.server_round})"
    elif local and for_new_site:
        layers = ("the coordinator's initial values (the study kept them at its sites; fit them to yours with "
                  "'medgan adapt')")
    elif local:
        raise MedGANError(f"this study kept {len(local)} array(s) at its sites ({local[0]}, …), which the coordinator "
                          "never received; at a site pass --site-state STATE_DIR, or --for-new-site for a hospital "
                          "outside the study")
    else:
        layers = "none: every array was shared"
    record = next(r for r in folder.read_metrics() if r["round"] == chosen)
    privacy = study.privacy
    provenance = {
        "study-id": study_id, "round": chosen, "rounds-planned": study.run.rounds,
        "sites": len(record.get("sites", [])),
        "aggregation": {"policy": study.aggregation.policy, "group-policies": study.aggregation.group_policies,
                        "local-norm": study.aggregation.local_norm,
                        "local-calibration": study.aggregation.local_calibration,
                        "finetune-steps": study.aggregation.finetune_steps,
                        "finetune-validate-every": study.aggregation.finetune_validate_every},
        "site-kept-layers": layers,
        "privacy": {"dp": privacy.enabled, "delta": privacy.delta if privacy.enabled else None,
                    "epsilon-per-site": [s.get("train", {}).get("epsilon") for s in record.get("sites", [])]},
        "trained-on": f"{study.task.modality} slices of {len(record.get('sites', []))} site(s), "
                      + geometry_words(study.task),
        "held-out": record.get("evaluate", {}),
        "initial-model": initial_model_provenance(study),
    }
    return save_model(out, arrays, study.task, provenance)


def _personal_words(study: StudyConfig, chosen: int, steps: int | None) -> str:
    """What a site's personal model of round ``chosen`` is, for the model file's provenance."""
    agg = study.aggregation
    if agg.ditto_steps:
        return (f"its Ditto model as of round {chosen} ({agg.ditto_steps} steps a round on its own data, each "
                f"pulled towards the global model, λ = {agg.ditto_lambda:g})")
    if steps is None or steps == agg.finetune_steps:
        return f"round {chosen}'s model fine-tuned for {agg.finetune_steps} steps on its own data"
    return (f"round {chosen}'s model fine-tuned for {steps} of {agg.finetune_steps} steps on its own data (the best "
            "on its validation subjects)")
