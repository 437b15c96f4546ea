"""The names a study's MLflow runs carry: tags, params and metrics, written by the pipeline (through
pipeline.tracking) and read by the status report, the fid stage and the analysis. One place, so that a writer and a
reader never spell a key two ways. Plain constants: importing this module imports nothing else.

A sweep has one parent run (tag ROLE = "sweep") and one child run per trial (ROLE = "trial", RUN_NAME = the
trial's stable run name). A trial's params are its flattened experiment config plus the model facts below; its
metrics are logged at step = training step.
"""

# --- tags ------------------------------------------------------------------------------------------------------
ROLE = "ditscale.role"  # "sweep" or "trial"
SWEEP = "ditscale.sweep"  # the experiment's name
RUN_NAME = "ditscale.run_name"  # the trial's stable run name (preset, hash of what shapes its trajectory)
PARENT = "mlflow.parentRunId"  # MLflow's own: the sweep run of a trial
FAILURE = "ditscale.failure"  # why the trial stopped for good (its reason, for people)
FAILURE_KIND = "ditscale.failure_kind"  # pipeline.trial_state.FailureKind: diverged | error | lost
RESUME_WARNING = "ditscale.resume_warning"  # checkpoints a resume had to skip, and why
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"

# the fid stage's facts, one set per scored run (a run refuses scores whose EXTRACTOR or PRECISION_FACTS differ)
FID_EXTRACTOR = "fid.extractor"
FID_EXTRACTOR_WEIGHTS = "fid.extractor_weights"
FID_EVALUATIONS_PER_IMAGE = "fid.evaluations_per_image"  # network evaluations per sample (sampling compute)
FID_PRECISION = "fid.precision"  # the DiT's sampling precision: bf16 | fp32
FID_DECODE_DTYPE = "fid.decode_dtype"  # the VAE's decoding dtype
FID_COMPILE = "fid.compile"  # whether the DiT was compiled for sampling
FID_PRECISION_FACTS = (FID_PRECISION, FID_DECODE_DTYPE, FID_COMPILE)
FID_DEVICE = "fid.device"  # where the sampling actors ran: cuda | cpu
FID_TRAIN_PRECISION = "fid.train_precision"  # the checkpoint's training precision (bf16 | fp32)
FID_TRAIN_COMPILE = "fid.train_compile"  # whether it was trained compiled
FID_REFERENCE = "fid.reference"  # the ADM reference batch, or "dataset statistics"
FID_NUM_SAMPLES = "fid.num_samples"
FID_SAMPLER = "fid.sampler"  # <sampler>-<steps>
FID_CFG_SCALE = "fid.cfg_scale"
FID_GUIDANCE_CHANNELS = "fid.guidance_channels"
FID_GUIDANCE_INTERVAL = "fid.guidance_interval"
FID_LABELS = "fid.labels"
FID_DINOV2_EXTRACTOR = "fid.fd_dinov2_extractor"
FID_CLASSIFIER_REAL_ACCURACY = "fid.classifier_real_accuracy"  # the classifier's held-out accuracy: the ceiling


def fid_error_tag(step: int) -> str:
    """The tag naming why the milestone of `step` could not be scored."""
    return f"fid.error.step{step}"


# --- params (besides the flattened experiment config: train.lr, model.mlp, ...) ---------------------------------
PRESET, SIZE, PATCH, PARAMS, GFLOPS = "preset", "size", "patch", "params", "gflops"
PARAM_RUN_NAME, VARIANT, SEED, OBJECTIVE = "run_name", "variant", "seed", "objective"
MANIFEST_TOTAL = "data.manifest_total"  # samples in the training shards
DEFAULT_VARIANT = "default"  # the `variant` of a study without variants or axes
AXIS_PREFIX = "axis."  # axis.<config path>: the value a grid axis or variant gave the trial


# --- metrics -----------------------------------------------------------------------------------------------------
LOSS, MSE, VB, GRAD_NORM, LR = "loss", "mse", "vb", "grad_norm", "lr"
IMG_PER_S, STEP_TIME_S, PEAK_MEMORY_GIB, MFU = "img_per_s", "step_time_s", "peak_memory_gib", "mfu"
EPOCH, IMAGES_SEEN = "epoch", "images_seen"
VAL_LOSS, VAL_LOSS_EMA = "val_loss", "val_loss_ema"
FID, CLASS_ACCURACY = "fid", "class_accuracy"


def loss_of_rank(rank: int) -> str:
    """Each rank's own window mean beside the logged mean (`loss_rank0`, ...), for trials of up to 8 workers."""
    return f"loss_rank{rank}"
