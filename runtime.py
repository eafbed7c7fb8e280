"""The run's machinery, apart from the method: processes, devices, checkpoints, resume and restart.

train.py and evaluate.py call it; mad.py and data.py know nothing of it. Sections:
  processes     torchrun's process group (NCCL or gloo), one GPU each, a gloo group for waits
  devices       TF32 and the attention backends on CUDA, the autocast precision, compile
  checkpoints   atomic saves, clear errors on load, a model from a checkpoint
  runs          a run lives in --out: the same command continues OUT/last.pt exactly, on any
                number of processes; a checkpoint of other settings is never overwritten
  starting      the data root (the synthetic set generated once per node), the caption
                tokenizer, ImageNet backbone weights
"""
import dataclasses
import os
import pickle
import random
import shutil
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torchvision

import coco
import data
import mad

# -----------------------------------------------------------------------------
# Processes. torchrun sets RANK; without it there is one process and every helper is a no-op.

WAIT_TIMEOUT = timedelta(hours=4)   # how long processes wait for rank 0 (scoring an evaluation)
wait_group = None                   # a gloo group for Python objects and waits (not gradients)


def init_processes(device, timeout_min=30.0):
    """Join the process group (NCCL on CUDA, gloo on the CPU; its collectives fail after
    timeout_min) and take this process's GPU: LOCAL_RANK's, or the only one visible where the
    launcher gives each process its own (CUDA_VISIBLE_DEVICES). -> (rank, world size, device)."""
    global wait_group
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{gpu_index(local_rank, torch.cuda.device_count())}"
        torch.cuda.set_device(device)                  # before NCCL's first collective
    # torchrun keeps its store across --max-restarts: a restarted attempt would find the
    # addresses of the processes it replaces there (gloo: "connection refused"), so each
    # attempt keys its own
    timeout = timedelta(minutes=timeout_min)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"attempt{attempt}", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout)
    wait_group = dist.new_group(backend="gloo", timeout=max(WAIT_TIMEOUT, timeout))
    return dist.get_rank(), dist.get_world_size(), device


def gpu_index(local_rank, visible):
    """The GPU of a process: its LOCAL_RANK among the visible ones, or the only one it sees."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise SystemExit(f"LOCAL_RANK {local_rank}, but this process sees {visible} GPU(s): "
                         f"give each process one (CUDA_VISIBLE_DEVICES) or start at most "
                         f"{visible} per node")
    return local_rank


def finish_processes():
    """All processes leave together (the last evaluation may keep rank 0 for minutes)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def barrier():
    """Wait for every process, on the wait group (a long timeout)."""
    if dist.is_initialized():
        dist.barrier(group=wait_group)


def gather(obj):
    """Every rank's obj, as a list (a list of one without DDP)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=wait_group)
    return out


def broadcast(obj):
    """Rank 0's obj on every rank (obj itself without DDP)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=wait_group)
    return box[0]


def all_reduce_mean(x):
    """A tensor averaged over the ranks (itself without DDP): the loss normalizers and logs."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# Devices

def check_device(device):
    """A device that is not there is named at once, before any data is read."""
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError as e:
        raise SystemExit(f"--device {device}: {e}") from None
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device}: choose cpu or cuda (cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: this process sees {torch.cuda.device_count()} "
                         f"GPU(s)")


def cuda_settings():
    """TF32 matmuls and convolutions (as the paper's A100s), and no cuDNN attention: it builds a
    plan for every new shape, and multi-scale training brings new shapes at almost every step."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)


def autocast_dtype(device, amp):
    """The autocast dtype (None: fp32). CUDA, unless --no-amp: bf16 on GPUs that have it natively
    (compute capability 8.0 on: A100, H100), else fp16 with a GradScaler (V100, T4: their bf16 is
    emulated and slow). CPU: fp32 unless --amp (bf16)."""
    if str(device).startswith("cuda"):
        if amp is False:
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if amp else None


def compile_model(model):
    """--compile: torch.compile the transformer encoder's layers and the decoder (and the baseline's
    cached decoding step) in place, so parameter names and checkpoints do not change. dynamic=True:
    multi-scale images and the per-task sequence lengths and counts share one graph. The backbone
    stays eager (inductor's convolutions guard on the feature map's width and would recompile for
    every image size), as do the head, the losses and the matcher."""
    for layer in model.encoder:
        layer.compile(dynamic=True)
    model.decode = torch.compile(model.decode, dynamic=True)
    if hasattr(model, "decode_step"):
        model.decode_step = torch.compile(model.decode_step, dynamic=True)
    return model


def warn_small_shm(workers):
    """Data-loader workers hand batches over through /dev/shm; a container's default 64 MB of it
    ends them with 'Bus error'."""
    if workers and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").total < 2 ** 30:
        size = shutil.disk_usage("/dev/shm").total / 2 ** 20
        print(f"warning: /dev/shm holds {size:.0f} MB: data-loader workers may die with "
              f"'Bus error'. Give the container more (docker run --shm-size 8g) or use "
              f"--workers 0", flush=True)


# -----------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, rename. A crash mid-write leaves the old file
    intact; a failed write (a full disk) removes the temporary file and says what it needs."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:           # torch.save reports a full disk as either
        if os.path.exists(tmp):
            os.remove(tmp)
        need = tensor_bytes(state) / 2 ** 20
        kept = f"{path} still holds the previous save" if os.path.exists(path) else "nothing saved"
        raise SystemExit(f"could not save {path} ({type(e).__name__}: {e}); a save needs about "
                         f"{need:,.0f} MB free in {os.path.dirname(os.path.abspath(path))}; "
                         f"{kept}") from None


def tensor_bytes(x):
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def load_checkpoint(path):
    """The checkpoint dict; clear errors for a missing, truncated or foreign file. Only tensors
    and plain Python values load (weights_only): a checkpoint holding other objects is refused
    unread, since unpickling them could run any code its author put in."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise SystemExit(f"{path}: cannot read the checkpoint (truncated or not a torch "
                             f"file?): {e}") from None
        raise SystemExit(f"{path}: refused: it holds Python objects other than tensors and plain "
                         f"values, and loading them could run code. MAD checkpoints hold none; "
                         f"one saved by a version of this code before weights-only checkpoints "
                         f"(numpy's RNG state was such an object) is refused too: "
                         f"{str(e).splitlines()[-1][:200]}") from None
    except Exception as e:
        raise SystemExit(f"{path}: cannot read the checkpoint (truncated or not a torch file?): "
                         f"{e}") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "vocab", "categories"} <= set(ckpt):
        raise SystemExit(f"{path}: not a MAD checkpoint (needs model, config, vocab, categories)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """(model in eval mode, caption tokenizer or None) of a checkpoint dict."""
    model = mad.build(config_from_dict(ckpt["config"]), mad.Vocab(**ckpt["vocab"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = mad.CaptionTokenizer(ckpt["spm"]) if ckpt.get("spm") else None
    return model.to(device).eval(), tokenizer


def config_from_dict(d):
    """Config from a checkpoint's dict (JSON-ish round trips turn tuples into lists)."""
    return mad.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# -----------------------------------------------------------------------------
# Runs: the same command, or --resume, continues OUT/last.pt exactly. Only settings that cannot
# change what the run computes may differ then; a different number of processes keeps the global
# batch and the position in the data (train.rank_order).

CHANGEABLE_AT_RESUME = ("workers", "log_every", "eval_every", "eval_images", "show", "save_every",
                        "compile", "pg_timeout", "device", "accum_steps", "skip_bad_images", "data",
                        "resume", "out")
GROWABLE_AT_RESUME = ("epochs", "max_steps")          # max_steps 0: no limit


def find_run(out, resume, rank):
    """(checkpoint, path): OUT/last.pt if this run has one, else None (rank 0 decides, every rank
    reads it), after checking that every process sees OUT: rank 0 writes the checkpoints there,
    so nodes must share its filesystem."""
    path = os.path.join(out, "last.pt")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    if dist.is_initialized():
        check_shared(out, rank)
    exists = broadcast(os.path.exists(path))
    if resume and not exists:
        raise SystemExit(f"--resume: no checkpoint at {path}")
    return (load_checkpoint(path) if exists else None), path


def check_shared(out, rank):
    """Every process sees the file rank 0 writes into `out`, or the run stops naming who does
    not."""
    probe = os.path.join(out, broadcast(f".shared-{socket.gethostname()}-{os.getpid()}"))
    if rank == 0:
        open(probe, "w").close()
    barrier()
    seen = gather((os.path.exists(probe), socket.gethostname()))
    blind = [(r, host) for r, (sees, host) in enumerate(seen) if not sees]
    barrier()
    if rank == 0:
        os.remove(probe)
    if blind:
        raise SystemExit(f"--out {out} is not shared by every node: processes {blind} do not see "
                         f"{probe}, which rank 0 wrote. Rank 0 writes the checkpoints and the "
                         f"tokenizer there: put --out on a filesystem that every node mounts "
                         f"at the same path")


def continue_run(ckpt, cfg, tc, given, path):
    """The settings of the run in ckpt: its own, with this command's changeable settings and its
    growable ones where they grow. With --resume only the flags given count; without, the whole
    command, which must then be the run's own: anything else would change the run and is refused.
    -> (mad.Config, the TrainConfig of the same type as tc)."""
    train_fields = type(tc).__dataclass_fields__
    saved = {k: v for k, v in ckpt["train"].items() if k in train_fields}
    then = {**dataclasses.asdict(config_from_dict(ckpt["config"])),
            **dataclasses.asdict(type(tc)(**saved))}
    now = {**dataclasses.asdict(cfg), **dataclasses.asdict(tc)}
    asked = {k: now[k] for k in given} if tc.resume else now

    def grows(k, v):
        if k == "max_steps":
            return v == 0 or 0 < then[k] <= v
        return v >= then[k]
    changed = [k for k, v in asked.items()
               if k not in CHANGEABLE_AT_RESUME and v is not None and v != then[k]
               and not (k in GROWABLE_AT_RESUME and grows(k, v))]
    if changed:
        diff = "; ".join(f"{flag(k)} {then[k]} there, {asked[k]} here" for k in changed)
        if tc.resume:
            free = ", ".join(flag(k) for k in CHANGEABLE_AT_RESUME if k not in ("resume", "out"))
            raise SystemExit(f"{path}: {diff}: that would change the run. At resume only "
                             f"{free} may change, and --epochs / --max-steps grow; start a new "
                             f"run with another --out")
        raise SystemExit(f"{path} holds a run with other settings ({diff}): continue it with "
                         f"`python train.py --out {tc.out} --resume`, or start this run with "
                         f"another --out")
    may_differ = CHANGEABLE_AT_RESUME + GROWABLE_AT_RESUME
    settings = {**then, **{k: v for k, v in asked.items() if k in may_differ and v is not None}}
    cfg = mad.Config(**{k: settings[k] for k in mad.Config.__dataclass_fields__})
    return cfg, type(tc)(**{k: settings[k] for k in train_fields})


def flag(name):
    return "--" + name.replace("_", "-")


def rng_state(device):
    """Every random generator a run draws from (CUDA: this process's device only), as tensors
    and plain values (numpy's key as a tensor), so that a checkpoint loads weights-only."""
    cuda = torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy = dict(kind=kind, key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                 has_gauss=int(has_gauss), gauss=float(gauss))
    return dict(torch=torch.get_rng_state(), cuda=cuda, numpy=numpy, python=random.getstate())


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and str(device).startswith("cuda"):
        cuda = state["cuda"]                     # (a list of every device's: older checkpoints)
        if isinstance(cuda, list):
            cuda = cuda[torch.device(device).index or 0]
        torch.cuda.set_rng_state(cuda, device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    random.setstate(state["python"])


def save_run(path, model, optimizer, scaler, cfg, tc, dataset, tokenizer, step, epoch, device):
    """Rank 0 writes the run to path (atomically), after every process checked that the replicas
    are equal; every process's RNG state goes with it. All processes leave together."""
    rngs = gather(rng_state(device))
    sums = gather([float(p.detach().double().sum()) for p in model.parameters()])
    if any(s != sums[0] for s in sums):                       # DDP keeps replicas equal; check it
        raise RuntimeError(f"step {step}: the {len(sums)} processes hold different parameters")
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(path, dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
            epoch=epoch, step=step, config=dataclasses.asdict(cfg), train=dataclasses.asdict(tc),
            vocab=dataset.vocab.state_dict(), spm=tokenizer.model_bytes if tokenizer else None,
            categories=dataset.categories, images=len(dataset), data=dataset.root, rng=rngs))
    barrier()


def restore(ckpt, model, optimizer, scaler, seed, rank, device):
    """The checkpoint's weights, optimizer, GradScaler and this rank's RNG state (a rank the run
    did not have gets a stream of its own, seeded by its rank and the step). -> the step to
    continue at."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][rank], device)
    else:
        torch.manual_seed(seed + rank + 1_000_003 * ckpt["step"])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# Starting a run: data, tokenizer, backbone weights

SYNTHETIC = dict(root="data/synthetic", train=1600, val=200)


def prepare_data(root):
    """The COCO root (a clear message when missing), or "synthetic": the synthetic set, generated
    once per node (by its first process; atomically, so that nodes sharing a filesystem do not
    collide). -> the root."""
    if root == "synthetic":
        root = SYNTHETIC["root"]
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            coco.ensure_synthetic_coco(root, SYNTHETIC["train"], SYNTHETIC["val"])
        barrier()
    data.check_root(root, "train2017")
    return root


def caption_tokenizer(root, out, vocab_size, given_model, tasks, ckpt):
    """The caption tokenizer, None without captions: the checkpoint's; or the SentencePiece
    model file `given_model`; or one trained once on the train captions by rank 0 (kept in
    OUT/spm.model and in the checkpoints). Rank 0 reads it and sends it to every process."""
    if ckpt is not None:
        return mad.CaptionTokenizer(ckpt["spm"]) if ckpt["spm"] else None
    captions = os.path.join(root, "annotations", "captions_train2017.json")
    path = given_model or os.path.join(out, "spm.model")
    model = None
    if (not dist.is_initialized() or dist.get_rank() == 0) and "cap" in tasks:
        if given_model or os.path.exists(path):
            model = read_tokenizer(path).model_bytes
        elif os.path.exists(captions):
            model = data.train_caption_tokenizer(captions, path[:-len(".model")], vocab_size)
    model = broadcast(model)
    return mad.CaptionTokenizer(model) if model else None


def read_tokenizer(path):
    """A SentencePiece model file as a CaptionTokenizer, its special ids checked; a missing,
    empty or truncated file is an error, never a silent switch-off of captioning."""
    what = ("delete it to train a new one" if os.path.basename(path) == "spm.model"
            else "pass a SentencePiece .model file")
    if not os.path.isfile(path):
        raise SystemExit(f"caption tokenizer {path} not found")
    with open(path, "rb") as f:
        model = f.read()
    try:
        tokenizer = mad.CaptionTokenizer(model)
        if tokenizer.vocab_size == 0:
            raise ValueError(f"{len(model)} bytes, no pieces")
    except Exception as e:
        raise SystemExit(f"{path}: not a SentencePiece model: empty or truncated (a run stopped "
                         f"while writing it?) ({type(e).__name__}: {e}); {what}") from None
    sp, expected = tokenizer.sp, dict(pad=0, eos=1, unk=2)
    ids = dict(pad=sp.pad_id(), eos=sp.eos_id(), unk=sp.unk_id())
    if ids != expected:
        raise SystemExit(f"{path}: its special ids are {ids}; MAD's caption rows need "
                         f"{expected} (as T5's and the authors' tokenizer)")
    return tokenizer


IMAGENET_WEIGHTS = {"r50": "ResNet50_Weights", "swin_b": "Swin_B_Weights",
                    "vit_b": "ViT_B_16_Weights"}
NEW_PARTS = ("neck.",)                # backbone parts that ImageNet classifiers do not have


def load_backbone_weights(backbone, name, path=None):
    """ImageNet weights into `backbone`: from a local state-dict file when `path` is given, else
    through torchvision's weights API (downloads once into the torch hub cache). -> what was
    loaded."""
    if path:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--backbone-weights {path}: cannot read a state dict ({e})") from None
        what = f"weights from {path}"
    elif name not in IMAGENET_WEIGHTS:
        layout = (", a Swin-B (window 12, 384 px) state dict in torchvision's key layout"
                  if name == "swin_b384" else "")
        raise SystemExit(f"torchvision has no ImageNet weights for backbone '{name}': pass "
                         f"--backbone-weights FILE{layout}, or --no-pretrained to train from "
                         f"random weights")
    else:
        weights = getattr(torchvision.models, IMAGENET_WEIGHTS[name]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            raise SystemExit(f"--pretrained: could not fetch torchvision's {weights} "
                             f"({type(e).__name__}: {e}). Without a network, pass "
                             f"--backbone-weights FILE (a state dict of torchvision's model, "
                             f"saved where it can be downloaded), or --no-pretrained to train "
                             f"from random weights") from None

        what = f"ImageNet weights ({weights})"
    missing, _ = backbone.load_state_dict(state, strict=False)   # the classifier head is not ours
    missing = [k for k in missing if not k.startswith(NEW_PARTS)]
    if missing:
        raise SystemExit(f"backbone weights for '{name}' lack {len(missing)} tensors, "
                         f"e.g. {missing[:3]}")
    return what
