"""Loading a vision-language model the same way for a Hub id and a local save_pretrained dir: the device of
this worker, the dtype, one short Hub probe first (an unreachable Hub is one line, not minutes of silent retries),
and access errors turned into one line that says what to do."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import workers
from .errors import FatalError, UsageError

log = logging.getLogger(__name__)

BIG_FOR_A_CPU = 1_000_000_000  # parameters: past this a caption on the CPU takes minutes (Gemma 3 4B: 4.3e9)


def choose_device() -> torch.device:
    """This worker's accelerator, made the current CUDA device: the process's place on its machine
    (LOCAL_RANK under torchrun / accelerate launch, SLURM_LOCALID under srun) picks the GPU. Current, because
    streams, events, pinned memory and memory queries without a device argument go to the current device:
    left at GPU 0, rank k's copy-done events would be recorded on GPU 0's stream, not the one doing its copies."""
    if torch.cuda.is_available():
        local, gpus, processes = workers.local_index(), torch.cuda.device_count(), workers.ranks_per_machine()
        device = torch.device("cuda", local % gpus)
        if processes > gpus and local >= gpus:  # (srun --gpus-per-task binds one GPU per task: not counted here)
            log.warning("%d processes on this machine (torchrun --nproc-per-node / accelerate --num_processes) but "
                        "%d GPU(s) visible: process %d shares GPU %d with process %d, each with its own copy of the "
                        "model and its own batch size (out of memory is likely); launch one process per GPU",
                        processes, gpus, local, device.index, device.index)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def gpus_torch_cannot_use() -> str | None:
    """Why this run would go to the CPU on a machine with NVIDIA GPUs (nvidia-smi lists them but torch sees
    none: a CPU-only torch, a driver older than torch's CUDA, a wrong CUDA_VISIBLE_DEVICES), or None. Hours of
    a rented GPU went to a CPU run before; CUDA_VISIBLE_DEVICES="" (or -1) says the CPU is meant."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available() or visible in ("", "-1") or (smi := shutil.which("nvidia-smi")) is None:
        return None
    try:
        smi_run = subprocess.Popen([smi, "-L"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = smi_run.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        smi_run.kill()  # not waited for: a wedged driver can hold it past the kill (subprocess.run would hang)
        return None
    except (OSError, subprocess.SubprocessError):
        return None
    said = (out + err).strip()
    if smi_run.returncode != 0 and "version mismatch" in said:  # a driver updated without a reboot
        return (f"nvidia-smi cannot reach this machine's GPUs ({said.splitlines()[0]}) and torch cannot either: "
                "reboot or reinstall the driver, or set CUDA_VISIBLE_DEVICES= to caption on the CPU")
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    if smi_run.returncode != 0 or not gpus:  # e.g. a Slurm job given no GPU: "No devices were found"
        return None
    why = ("it is a CPU-only build" if torch.version.cuda is None else
           f"it is built for CUDA {torch.version.cuda} but finds no usable GPU (a driver too old for it? "
           f"CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'})")
    return (f"nvidia-smi lists {len(gpus)} GPU(s) but torch {torch.__version__} cannot use them: {why}; install "
            "a torch that can (rerun ./setup.sh on this machine), or set CUDA_VISIBLE_DEVICES= to caption on the CPU")


def _check_cpu_run(model_name: str, cached_only: bool) -> None:
    """Before the weights load: a model too big for the CPU is refused on a machine whose GPUs torch cannot
    use, and said elsewhere (a tiny model, the demo's, runs on the CPU in seconds)."""
    from transformers import AutoConfig

    from .batch_size import parameter_bytes

    parameters = parameter_bytes(AutoConfig.from_pretrained(model_name, local_files_only=cached_only), 1)
    if parameters <= BIG_FOR_A_CPU:
        return
    problem = gpus_torch_cannot_use()
    if problem:
        raise UsageError(problem)
    log.warning("no GPU: %s has %.1fB parameters and captions on the CPU (expect minutes per image)", model_name,
                parameters / 1e9)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPUs run bf16 matmuls slowly or not at all


def _model_load_error(model_name: str, e: Exception) -> UsageError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain = [e, e.__cause__, e.__context__]
    text = " ".join(str(x) for x in chain if x is not None).lower()
    if any(isinstance(x, GatedRepoError) for x in chain) or "gated" in text:
        return UsageError(f"{model_name} is a gated model: accept its licence at https://huggingface.co/{model_name} "
                          "and log in with `hf auth login` (or set HF_TOKEN)")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain) or "not a valid model identifier" in text:
        return UsageError(f"model {model_name!r} was not found (or you have no access): check the id, e.g. "
                          "google/gemma-3-4b-it, or pass a local directory saved with save_pretrained")
    if any(isinstance(x, LocalEntryNotFoundError) for x in chain) or "offline" in text or "connect" in text:
        return UsageError(f"cannot download {model_name}: no connection to the Hub (or HF_HUB_OFFLINE=1) and it is "
                          "not in the local cache; download it once with network access")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UsageError(f"cannot load model {model_name!r}: {first_line}")


HUB_PROBE_TIMEOUT_S = 10.0  # one request; without it an unreachable Hub costs minutes of silent retries


def _hub_reachable(model_name: str) -> bool:
    """Whether the Hub answers about `model_name` now. Unreachable and not cached: FatalError (exit 1) at once.

    from_pretrained retries every file with back-off when the network is down (minutes, silent); one short
    request first tells a cached model to load offline and an uncached one to fail now, in one line."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .hub_retry import NETWORK_ERRORS

    try:
        validate_repo_id(model_name)
    except HFValidationError:  # a path that is not there, say: from_pretrained's own error says what is wrong
        return True
    why = "HF_HUB_OFFLINE is set"
    if not constants.is_offline_mode():
        try:
            HfApi().model_info(model_name, timeout=HUB_PROBE_TIMEOUT_S)
            return True
        except HfHubHTTPError:  # the Hub answered (not found, gated...): from_pretrained says what to do
            return True
        except (*NETWORK_ERRORS, OSError) as e:
            why = f"the Hub ({constants.ENDPOINT}) is unreachable: {type(e).__name__}"
    if isinstance(try_to_load_from_cache(model_name, "config.json"), str):
        log.warning("%s; loading %s from the local cache", why, model_name)
        return False
    raise FatalError(f"cannot download {model_name}: {why}, and it is not in the local cache; connect to the "
                     "network (or unset HF_HUB_OFFLINE), or pass a local directory saved with save_pretrained")


def load_model(model_name: str, device: torch.device, *, dtype: str = "auto", device_map: str | None = None,
               attn_implementation: str = "sdpa"):
    """(model, processor) the same way for a hub id and a local save_pretrained dir."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    placement: Any = device_map if device_map else {"": str(device)}
    log.info("loading model %s on %s ...", model_name, device)
    cached_only = not Path(model_name).is_dir() and not _hub_reachable(model_name)
    try:
        processor = AutoProcessor.from_pretrained(model_name, local_files_only=cached_only)
        if device.type == "cpu" and device_map != "cpu":  # accelerate's strategies too: all on the CPU here
            _check_cpu_run(model_name, cached_only)
        model = AutoModelForImageTextToText.from_pretrained(
            model_name, dtype=resolve_dtype(dtype, device), device_map=placement,
            attn_implementation=attn_implementation, local_files_only=cached_only)
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and "attn_implementation" not in str(e) and "attention" not in str(e).lower():
            raise _model_load_error(model_name, e) from None
        if isinstance(e, ValueError):
            raise UsageError(f"--attn-implementation {attn_implementation} is not available here: "
                             f"{str(e).splitlines()[0]}; try sdpa") from None
        raise _model_load_error(model_name, e) from None
    offloaded = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()} & {"cpu", "disk"})
    if offloaded and device.type == "cuda":
        log.warning("the model does not fit on the GPU: layers are offloaded to %s; expect a large slow-down "
                    "(use a smaller Gemma 3 or a bigger GPU)", "/".join(offloaded))
    model.eval()
    return model, processor


def check_context(model_config, prompt_tokens: int, max_tokens: int, model_name: str) -> None:
    """A UsageError when the prompt + --max-tokens is longer than the model's context (its text config's
    max_position_embeddings): past it the model has no positions to attend with, and the KV cache and
    --batch-size auto would be sized for tokens it cannot use. No limit known: nothing to check."""
    context = getattr(model_config.get_text_config(decoder=True), "max_position_embeddings", None)
    if not context or prompt_tokens + max_tokens <= int(context):
        return
    room = int(context) - prompt_tokens
    raise UsageError(f"--max-tokens {max_tokens} does not fit {model_name}'s context of {context} tokens: the "
                     f"prompt (image included) takes {prompt_tokens}, leaving "
                     + (f"{room}; use --max-tokens {room} or less" if room > 0 else "none; shorten the prompt"))


def spread_over_devices(model) -> bool:
    """Whether --device-map placed `model` on more than one device (GPUs, or offloaded to the CPU / disk):
    accelerate then moves weights in hooks around each module, and each layer keeps its own device."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
