"""Run by tests/pipeline/test_gpu_paths.py in a process of its own: a Ray instance with logical GPUs
(`ray.init(num_cpus=64, num_gpus=8)`, one 8-GPU node as the paper grid's clusters have) and a driver that believes it
has CUDA (`torch.cuda.is_available()` is True) but raises on any attempt to create a CUDA tensor or initialise CUDA.
It scores a smoke checkpoint through the fid stage, plans paper_grid on this cluster, places an 8-GPU trial and the
sampling actors that score between trials, and writes what it found as JSON.

    python -m tests.pipeline.emulated_gpus WORKDIR CHECKPOINT OUT.json
"""

import json
import sys

import ray
import torch


class DriverTouchedCuda(RuntimeError):
    pass


def forbid_cuda() -> None:
    """torch.cuda.is_available() says True, and initialising CUDA (which every CUDA tensor, .cuda() and .to("cuda")
    does first) raises."""

    def refuse(*args, **kwargs):
        raise DriverTouchedCuda("the driver tried to initialise CUDA")

    torch.cuda.is_available = lambda: True
    torch.cuda._lazy_init = refuse
    torch.cuda.init = refuse


def main(workdir: str, checkpoint: str, out: str) -> None:
    from pipeline.config import ConfigError
    from pipeline.experiment_files import load_experiment
    from pipeline.fid.sampling import SamplerPool
    from pipeline.fid.score import score_checkpoint
    from pipeline.manifest import Manifest
    from pipeline.ray_utils import start_local_ray
    from pipeline.slots import sampling_reservation
    from pipeline.sweep import check_cluster, max_concurrent
    from tests.helpers import FAST_FID

    start_local_ray(num_cpus=64, num_gpus=8, include_dashboard=False, log_to_driver=False)
    forbid_cuda()
    found = {}
    try:
        torch.zeros(1, device="cuda")
        found["guard"] = "no error"
    except DriverTouchedCuda as exc:
        found["guard"] = str(exc)

    # The fid stage: sampling actors with one (logical) GPU each; the driver only merges features.
    fid = load_experiment("smoke", [*FAST_FID, "fid.gpus_per_worker=1", "fid.reference_images=190"]).fid
    manifest = Manifest.load(f"{workdir}/shards/smoke")
    with SamplerPool(manifest.codec, fid, workers=2) as pool:
        found["reserved"] = pool.reserved
        metrics, _, facts = score_checkpoint(checkpoint, manifest, fid, workdir, progress=False, pool=pool)
    found["fid"], found["facts"] = metrics["fid"], facts

    # paper_grid on this one 8-GPU node: a trial takes the 8 GPUs; scoring between trials costs no slot.
    paper = load_experiment("paper_grid")
    check_cluster(paper)
    found["paper_slots"] = max_concurrent(paper)
    spare = load_experiment("paper_grid", ["fid.schedule=spare"])
    try:
        check_cluster(spare, sampling_reservation(spare, ray.cluster_resources()))
        found["spare"] = "accepted"
    except ConfigError as exc:
        found["spare"] = str(exc)

    # Placement: the trial's worker group (8 x {1 GPU, 4 CPU}, as Ray Train asks), then, once it has ended, the
    # sampling actors that score its milestones in its slot (fid.workers 0: one per trial worker).
    from ray.util.placement_group import placement_group, remove_placement_group

    r, f = paper.resources, paper.fid
    trial = placement_group([{"GPU": r.gpus_per_worker, "CPU": r.cpus_per_worker}] * r.workers_per_trial)
    found["trial_placed"] = trial.wait(60)
    remove_placement_group(trial)
    scoring = placement_group(
        [{"GPU": f.gpus_per_worker, "CPU": f.cpus_per_worker}] * (f.workers or r.workers_per_trial)
    )
    found["scoring_placed"] = scoring.wait(60)
    remove_placement_group(scoring)

    try:
        torch.ones(2).cuda()
        found["guard_after"] = "no error"
    except DriverTouchedCuda as exc:
        found["guard_after"] = str(exc)
    with open(out, "w") as fh:
        json.dump(found, fh)
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
