"""Train MAD on COCO (or the synthetic set): DDP + AMP, the paper's schedules, runs that survive restarts.

    python train.py --demo                                         # synthetic data, tiny model: minutes on a CPU
    torchrun --nproc_per_node 8 train.py --backbone r50            # COCO in data/coco ($COCO_ROOT): the paper's recipe
    torchrun --nnodes 2 --node-rank N --nproc-per-node 8 --rdzv-endpoint HOST:29500 train.py --backbone swin_b --out /shared/swin
    python train.py --backbone r50 --accum-steps 8                 # the paper's batch 16 on one GPU
    python train.py --out runs/mad --resume                        # continue runs/mad with its own settings

Every field of mad.Config and TrainConfig is a flag (--mask-ratio 0.6, --cap-ratios 1,0.7 ...);
--backbone picks the model preset and the paper's schedule (Table 9) first, explicit flags win.
A run lives in --out: the same command started again (a requeued job, torchrun --max-restarts)
continues from OUT/last.pt, exactly; a checkpoint of other settings there is never overwritten.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
import mad


@dataclass
class TrainConfig:
    data: str = os.environ.get("COCO_ROOT", "data/coco")   # COCO-layout root, or "synthetic"
    out: str = "runs/mad"             # the run: checkpoints, log.jsonl, evaluations (shared by all nodes)
    epochs: int = 50
    lr_drop: int = 40                 # epoch at which the learning rate drops x0.1 (lr_schedule "step")
    lr_schedule: str = "step"         # step: x0.1 at lr_drop (paper) | cosine: to 0 at the last step
    warmup: int = 0                   # steps of linear learning-rate warm-up
    hold: int = 0                     # cosine: steps at the full rate after the warm-up, before the decay
    batch_size: int = 16              # global: over all processes and accumulation steps
    accum_steps: int = 1              # gradient accumulation (paper batch on fewer GPUs)
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    clip: float = 0.1                 # gradient norm clipping
    amp: "bool | None" = None         # default: on CUDA (bf16 where native, else fp16 + GradScaler), off on CPUs
    compile: bool = False             # torch.compile the transformer encoder and the decoder
    max_steps: int = 0                # stop after this many optimizer steps (0: run all epochs)
    save_every: int = 0               # also save last.pt every N steps (0: once per epoch)
    eval_every: int = 0               # evaluate on val2017 every N epochs (0: never)
    eval_images: int = 0              # cap on images for those evaluations (0: all)
    show: int = 0                     # pictures of predictions written at each evaluation
    log_every: int = 20
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    workers: int = 4
    seed: int = 0
    resume: bool = False              # continue OUT/last.pt with its own settings (the flags below may change)
    demo: bool = False                # synthetic set, tiny model, a plan for this machine, evaluation at the end
    budget_min: float = 0.0           # --demo: wall minutes the plan fits the run into (0: 13.5 on a CPU, 2.5 on a GPU)
    spm_vocab: int = 8000             # SentencePiece vocabulary trained on the train captions
    skip_bad_images: bool = False     # skip (and count) missing or corrupt images instead of failing
    augment: bool = True              # flip, crop, multi-scale / LSJ (off: the fixed evaluation resize)
    pretrained: bool = True           # torchvision ImageNet backbone weights (needs a network once)
    backbone_weights: str = ""        # ... or a local state-dict file of them
    pg_timeout: float = 30.0          # minutes a collective may wait for another process before the run fails


# Paper Table 9 per backbone; the tiny preset trains from random weights
SCHEDULES = {                         # (warm-up: the authors' Swin schedule warms up for 250 iterations)
    "r50": dict(epochs=50, lr_drop=40, batch_size=16),
    "swin_b": dict(epochs=300, lr_drop=240, batch_size=32, warmup=250),
    "swin_b384": dict(epochs=300, lr_drop=240, batch_size=32, warmup=250),
    "vit_b": dict(epochs=100, lr_drop=80, batch_size=32),
    "tiny": dict(epochs=12, lr_drop=10, batch_size=16, lr=5e-4, backbone_lr=5e-4, clip=1.0, workers=1,
                 spm_vocab=200, log_every=25, pretrained=False),
}
# the demo: tiny model at 128 px with a 2-layer decoder (more images in its minutes: RESULTS.md), no
# augmentation; batch, steps and workers are planned for the machine (None: plan_demo chooses; explicit
# flags win)
DEMO = dict(data="synthetic", out="runs/demo", backbone="tiny", dec_layers=2, eval_every=0, show=4, augment=False,
            lr=1e-3, backbone_lr=1e-3, warmup=100, hold=200, lr_schedule="cosine", pretrained=False,
            epochs=10 ** 6, batch_size=None, max_steps=None, workers=None)
SYNTHETIC = dict(root="data/synthetic", train=1600, val=200)


# -----------------------------------------------------------------------------
# Configuration: dataclass defaults <- backbone preset and schedule <- --demo <- explicit flags

def parse_args(argv=None):
    """-> (mad.Config, TrainConfig, {flag: value} of the flags given explicitly)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(mad.Config) + dataclasses.fields(TrainConfig)}
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        if f.type in (bool, "bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(f.default, tuple):
            kind = type(f.default[0])
            p.add_argument(flag, type=lambda s, k=kind: tuple(k(x) for x in s.split(",")), default=None,
                           metavar="A,B,...")
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    settings = dict(DEMO) if given.get("demo") else {}
    backbone = given.get("backbone", settings.get("backbone", mad.Config.backbone))
    settings = {**mad.PRESETS[backbone], **SCHEDULES[backbone], **settings, **given}
    cfg = mad.Config(**{k: v for k, v in settings.items() if k in mad.Config.__dataclass_fields__})
    tc = TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
    return cfg, tc, given


# -----------------------------------------------------------------------------
# A run that survives restarts: the same command, or --resume, continues OUT/last.pt exactly.
# Only settings that cannot change what the run computes may differ then; a different number
# of processes keeps the global batch and the position in the data (see rank_order).

FREE = ("workers", "log_every", "eval_every", "eval_images", "show", "save_every", "compile", "pg_timeout",
        "device", "accum_steps", "skip_bad_images", "data", "budget_min", "resume", "out")
GROW = ("epochs", "max_steps")        # may grow at resume (max_steps 0: no limit)


def continue_run(ckpt, cfg, tc, given, path):
    """The settings of the run in ckpt: its own, with this command's FREE settings and its GROW
    settings where they grow. With --resume only the flags given count; without, the whole command,
    which must then be the run's own: anything else would change the run and is refused."""
    train_fields = TrainConfig.__dataclass_fields__
    then = {**dataclasses.asdict(mad.config_from_dict(ckpt["config"])),
            **dataclasses.asdict(TrainConfig(**{k: v for k, v in ckpt["train"].items() if k in train_fields}))}
    now = {**dataclasses.asdict(cfg), **dataclasses.asdict(tc)}
    asked = {k: now[k] for k in given} if tc.resume else now
    grows = lambda k, v: v == 0 or 0 < then[k] <= v if k == "max_steps" else v >= then[k]
    changed = [k for k, v in asked.items() if k not in FREE and v is not None and v != then[k]
               and not (k in GROW and grows(k, v))]
    if changed:
        diff = "; ".join(f"--{k.replace('_', '-')} {then[k]} there, {asked[k]} here" for k in changed)
        if tc.resume:
            raise SystemExit(f"{path}: {diff}: that would change the run. At resume only "
                             f"{', '.join('--' + k.replace('_', '-') for k in FREE[:-2])} may change, and "
                             f"--epochs / --max-steps grow; start a new run with another --out")
        raise SystemExit(f"{path} holds a run with other settings ({diff}): continue it with "
                         f"`python train.py --out {tc.out} --resume`, or start this run with another --out")
    settings = {**then, **{k: v for k, v in asked.items() if (k in FREE or k in GROW) and v is not None}}
    cfg = mad.Config(**{k: settings[k] for k in mad.Config.__dataclass_fields__})
    return cfg, TrainConfig(**{k: settings[k] for k in train_fields})


def find_run(tc, rank):
    """OUT/last.pt if this run has one (rank 0 decides, every rank reads it), after checking that every
    process sees OUT: rank 0 writes the checkpoints there, so nodes must share its filesystem."""
    path = os.path.join(tc.out, "last.pt")
    if rank == 0:
        os.makedirs(tc.out, exist_ok=True)
    if dist.is_initialized():
        probe = os.path.join(tc.out, mad.broadcast(f".shared-{socket.gethostname()}-{os.getpid()}"))
        if rank == 0:
            open(probe, "w").close()
        mad.barrier()
        blind = [(r, host) for r, (seen, host) in enumerate(mad.gather((os.path.exists(probe), socket.gethostname())))
                 if not seen]
        mad.barrier()
        if rank == 0:
            os.remove(probe)
        if blind:
            raise SystemExit(f"--out {tc.out} is not shared by every node: processes {blind} do not see {probe}, "
                             f"which rank 0 wrote. Rank 0 writes the checkpoints and the tokenizer there: put --out "
                             f"on a filesystem that every node mounts at the same path")
    exists = mad.broadcast(os.path.exists(path))
    if tc.resume and not exists:
        raise SystemExit(f"--resume: no checkpoint at {path}")
    return (mad.load_checkpoint(path), path) if exists else (None, path)


def rank_order(n, seed, epoch, rank, world, start):
    """The images a process reads in an epoch from global position `start` on: the epoch's permutation
    of the n images, seeded by (seed, epoch), dealt round-robin, so that global step s reads positions
    s*B .. (s+1)*B - 1 of it whatever the number of processes."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[start + rank::world].tolist()


def rng_state(device):
    """Every random generator a run draws from (CUDA: this process's device only)."""
    cuda = torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None
    return dict(torch=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), python=random.getstate())


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and str(device).startswith("cuda"):
        cuda = state["cuda"]                             # (a list of every device's: older checkpoints)
        torch.cuda.set_rng_state(cuda[torch.device(device).index or 0] if isinstance(cuda, list) else cuda, device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_run(path, raw, optimizer, scaler, cfg, tc, dataset, tokenizer, step, epoch, device):
    """Rank 0 writes the run to path (atomically), after every process checked that the replicas are
    equal; every process's RNG state goes with it. All processes leave together."""
    rngs = mad.gather(rng_state(device))
    sums = mad.gather([float(p.detach().double().sum()) for p in raw.parameters()])
    if any(s != sums[0] for s in sums):                       # DDP keeps replicas equal; check it
        raise RuntimeError(f"step {step}: the {len(sums)} processes hold different parameters")
    if not dist.is_initialized() or dist.get_rank() == 0:
        mad.save_checkpoint(path, dict(
            model=raw.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
            step=step, config=dataclasses.asdict(cfg), train=dataclasses.asdict(tc), vocab=dataset.vocab.state_dict(),
            spm=tokenizer.model_bytes if tokenizer else None, categories=dataset.categories, images=len(dataset),
            data=dataset.root, rng=rngs))
    mad.barrier()


# -----------------------------------------------------------------------------
# Data, tokenizer, model: what a run starts from

def prepare_data(tc):
    """The COCO root (a clear message when missing), or the synthetic set, generated once per node
    (by its first process; atomically, so that nodes sharing a filesystem do not collide)."""
    root = tc.data
    if root == "synthetic":
        root = SYNTHETIC["root"]
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            data.ensure_synthetic_coco(root, SYNTHETIC["train"], SYNTHETIC["val"])
        mad.barrier()
    data.check_root(root, "train2017")
    return root


def caption_tokenizer(tc, root, ckpt):
    """SentencePiece trained once on the train captions by rank 0 (kept in OUT/spm.model and in the
    checkpoints) and sent to every process; None without captions."""
    if ckpt is not None:
        return mad.CaptionTokenizer(ckpt["spm"]) if ckpt["spm"] else None
    captions, prefix = os.path.join(root, "annotations", "captions_train2017.json"), os.path.join(tc.out, "spm")
    model = None
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.exists(captions):
        if not os.path.exists(prefix + ".model"):
            data.train_caption_tokenizer(captions, prefix, tc.spm_vocab)
        with open(prefix + ".model", "rb") as f:
            model = f.read()
    model = mad.broadcast(model)
    return mad.CaptionTokenizer(model) if model else None


def autocast_dtype(device, amp):
    """The autocast dtype (None: fp32). CUDA, unless --no-amp: bf16 on GPUs that have it natively
    (compute capability 8.0 on: A100, H100), else fp16 with a GradScaler (V100, T4: their bf16 is
    emulated and slow). CPU: fp32 unless --amp (bf16)."""
    if str(device).startswith("cuda"):
        if amp is False:
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if amp else None


IMAGENET_WEIGHTS = {"r50": "ResNet50_Weights", "swin_b": "Swin_B_Weights", "vit_b": "ViT_B_16_Weights"}
NEW_PARTS = ("neck.",)                # backbone parts that ImageNet classifiers do not have


def load_backbone_weights(backbone, name, path=None):
    """ImageNet weights into `backbone`: from a local state-dict file when `path` is given, else
    through torchvision's weights API (downloads once into the torch hub cache). -> what was loaded."""
    if path:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--backbone-weights {path}: cannot read a state dict ({e})") from None
        what = f"weights from {path}"
    elif name not in IMAGENET_WEIGHTS:
        raise SystemExit(f"torchvision has no ImageNet weights for backbone '{name}': pass --backbone-weights FILE"
                         + (", a Swin-B (window 12, 384 px) state dict in torchvision's key layout" if name == "swin_b384"
                            else "") + ", or --no-pretrained to train from random weights")
    else:
        weights = getattr(torchvision.models, IMAGENET_WEIGHTS[name]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            raise SystemExit(f"--pretrained: could not fetch torchvision's {weights} ({type(e).__name__}: {e}). "
                             f"Without a network, pass --backbone-weights FILE (a state dict of torchvision's model, "
                             f"saved where it can be downloaded), or --no-pretrained to train from random weights") from None
        what = f"ImageNet weights ({weights})"
    missing, _ = backbone.load_state_dict(state, strict=False)   # the classifier head is not ours
    missing = [k for k in missing if not k.startswith(NEW_PARTS)]
    if missing:
        raise SystemExit(f"backbone weights for '{name}' lack {len(missing)} tensors, e.g. {missing[:3]}")
    return what


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
    """Data-loader workers hand batches over through /dev/shm; a container's default 64 MB of it ends
    them with 'Bus error'."""
    if workers and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").total < 2 ** 30:
        print(f"warning: /dev/shm holds {shutil.disk_usage('/dev/shm').total / 2 ** 20:.0f} MB: data-loader workers "
              f"may die with 'Bus error'. Give the container more (docker run --shm-size 8g) or use --workers 0",
              flush=True)


# -----------------------------------------------------------------------------
# The demo's plan: batch by device, data workers by cores, steps by the measured speed. The steps
# are planned from a few timed steps at the start and revised once, at the end of the warm-up and
# the hold (the learning rate does not depend on the total until there, so the printed flags
# repeat the run exactly): a machine's first steps can be slower than its later ones.

def plan_demo(tc, dataset, model, autocast, ckpt, master, world, device, started):
    """Fill the demo's unset batch_size, max_steps and workers for this machine and print the plan.
    A resumed run keeps its checkpoint's plan. Every rank times its share of a batch (the loss's
    all-reduces run in step); rank 0's plan is the one every rank follows. -> the DemoClock that
    revises the steps later (None for a resumed run or explicit --max-steps)."""
    if ckpt is not None:
        plan = {k: ckpt["train"][k] for k in ("batch_size", "max_steps", "workers", "hold")}
        plan["workers"] = tc.workers if tc.workers is not None else plan["workers"]
        clock = None
    else:
        cuda = str(device).startswith("cuda")
        plan = dict(batch_size=tc.batch_size or (32 if cuda else 8),
                    workers=tc.workers if tc.workers is not None else min(8, (os.cpu_count() or 2) - 1) if cuda else 1)
        clock = None if tc.max_steps else DemoClock(60 * (tc.budget_min or (2.5 if cuda else 13.5)), started)
        if clock:
            step_s, clock.eval_s = time_pipeline(model, dataset, tc, plan, autocast, world, device)
            plan["max_steps"] = clock.steps_that_fit(0, step_s, margin=0.9)
            if master:
                print(f"timed {step_s:.2f} s a step, {clock.eval_s:.0f} s for the final evaluation", flush=True)
            clock.at = min(tc.warmup + tc.hold, plan["max_steps"] // 2)     # revised there: half way at the latest
            plan["hold"] = max(0, clock.at - tc.warmup)                       # the cosine starts after it
        else:
            plan["max_steps"], plan["hold"] = tc.max_steps, tc.hold
        plan = mad.broadcast(plan)
        if master:
            print_plan(plan, cuda)
    for k, v in plan.items():
        setattr(tc, k, v)
    return clock


def print_plan(plan, cuda, revised=False):
    print(f"demo plan{' revised' if revised else ''} for {'cuda' if cuda else 'cpu'} ({torch.get_num_threads()} threads): "
          f"batch {plan['batch_size']}, {plan['max_steps']:,} steps, {plan['workers']} workers; the same run: "
          f"--batch-size {plan['batch_size']} --max-steps {plan['max_steps']} --workers {plan['workers']} "
          f"--hold {plan['hold']}", flush=True)


class DemoClock:
    """The demo's time budget: how many steps fit into what is left of it (the final evaluation
    reserved), and the one revision, at step `at`, from the rate of the last min(90, at / 2) steps."""

    def __init__(self, budget_s, started, at=300, clock=time.time):
        self.budget_s, self.started, self.at, self.clock, self.eval_s, self.mark = budget_s, started, at, clock, 0.0, None

    def steps_that_fit(self, step, step_s, margin):
        left = self.budget_s - (self.clock() - self.started) - self.eval_s - 10     # 10 s: COCOeval, pictures
        return max(step + 1, step + int(margin * left / step_s))

    def after_step(self, step, tc, master, cuda=False):
        """Called after each optimizer step (step counts the steps done); revises tc.max_steps at `at`."""
        window = min(90, self.at // 2)
        if step == self.at - window:
            self.mark = self.clock()
        if step == self.at and self.mark is not None:
            tc.max_steps = mad.broadcast(self.steps_that_fit(step, (self.clock() - self.mark) / window, margin=0.97))
            if master:
                print_plan(dict(batch_size=tc.batch_size, max_steps=tc.max_steps, workers=tc.workers, hold=tc.hold), cuda,
                           revised=True)
        return tc.max_steps


def time_pipeline(model, dataset, tc, plan, autocast, world, device, eval_images=SYNTHETIC["val"]):
    """Seconds per training step and for the final evaluation, timed through the real pipeline on a
    copy of the model: the data loader with the plan's workers, train_step (its per-step
    synchronization included) and AdamW, for a few steps after a warm-up; then one evaluation batch."""
    rng = torch.get_rng_state()                              # the probe's random masks leave no trace
    cuda = str(device).startswith("cuda")
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters(), 1e-4, fused=cuda)
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=False)
    loader = torch.utils.data.DataLoader(dataset, max(1, plan["batch_size"] // world), num_workers=plan["workers"],
                                         collate_fn=pad_to_128, pin_memory=cuda, drop_last=True)
    warm, timed = 3, 20 if cuda else 5
    for k, batch in zip(range(warm + timed), loader):
        if k == warm:
            t = timer(device)
        batch = to_device(batch, device)
        train_step(probe, probe, [batch], dataset.tasks, optimizer, scaler, autocast, tc.clip)
    step_s = (timer(device) - t) / timed
    with torch.no_grad():
        probe.eval()
        for _ in range(2):                                   # warm-up, then timed
            t = timer(device)
            probe.predict(batch["images"], batch["pad_mask"], batch["orig_size"], dataset.tasks)
            eval_s = (timer(device) - t) / len(batch["images"]) * eval_images
    torch.set_rng_state(rng)
    return step_s, eval_s


def timer(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


# -----------------------------------------------------------------------------
# Training: 3.4 task-mixed sampling, every image trains all the tasks it has

def main(argv=None):
    started = time.time()
    cfg, tc, given = parse_args(argv)
    rank, world, device = mad.init_processes(tc.device, tc.pg_timeout)
    master = rank == 0
    ckpt, path = find_run(tc, rank)
    if ckpt is not None:
        cfg, tc = continue_run(ckpt, cfg, tc, given, path)
    root = tc.data = prepare_data(tc)                       # the checkpoint names the real root (evaluate.py)
    tokenizer = caption_tokenizer(tc, root, ckpt)
    try:
        dataset = data.CocoMultiTask(root, "train2017", cfg, tokenizer, train=True, seed=tc.seed, augment=tc.augment,
                                     skip_bad_images=tc.skip_bad_images, categories=ckpt["categories"] if ckpt else None)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if ckpt is not None and ckpt.get("images", len(dataset)) != len(dataset):
        raise SystemExit(f"{path}: the run trained on {ckpt['images']} images; {root} has {len(dataset)}")
    model, optimizer, weights = start_model(cfg, tc, dataset, device, ckpt)
    amp = autocast_dtype(device, tc.amp)
    autocast = torch.autocast(device.split(":")[0], dtype=amp) if amp else nullcontext()
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp == torch.float16)
    clock = plan_demo(tc, dataset, model, autocast, ckpt, master, world, device, started) if tc.demo else None
    if tc.batch_size % (world * tc.accum_steps):
        raise SystemExit(f"--batch-size {tc.batch_size} must be divisible by processes ({world}) x "
                         f"--accum-steps ({tc.accum_steps})")
    micro, step = tc.batch_size // (world * tc.accum_steps), 0
    torch.manual_seed(tc.seed + rank)                        # masking differs across ranks
    if ckpt is not None:
        step, weights = restore(ckpt, model, optimizer, scaler, tc, rank, device), f"resumed at step {ckpt['step']}"
    raw = compile_model(model) if tc.compile else model
    if world > 1:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    steps_per_epoch = len(dataset) // tc.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one global batch of {tc.batch_size}")
    total = tc.epochs * steps_per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * steps_per_epoch)
    if master:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[amp]
        print(f"{cfg.backbone}: {weights}; {precision}; {len(dataset):,} images, tasks {', '.join(dataset.tasks)}; "
              f"{world} process(es) x {micro} images x {tc.accum_steps} accumulation = global batch {tc.batch_size}; "
              f"{steps_per_epoch:,} steps/epoch, {total:,} steps; {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M "
              f"parameters", flush=True)
    warn_small_shm(tc.workers)
    save = lambda epoch: save_run(path, raw, optimizer, scaler, cfg, tc, dataset, tokenizer, step, epoch, device)
    t0, start_step, logged, seen = time.time(), step, step, 0
    sums = torch.zeros(1 + len(dataset.tasks))                # total and per-task losses since the last log
    while step < total:
        epoch = step // steps_per_epoch
        batches = epoch_batches(dataset, tc, epoch, (step - epoch * steps_per_epoch) * tc.batch_size, rank, world,
                                micro, device)
        while step < total and step < (epoch + 1) * steps_per_epoch:
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, steps_per_epoch, tc)
            micro_batches = [to_device(next(batches), device) for _ in range(tc.accum_steps)]
            losses = train_step(model, raw, micro_batches, dataset.tasks, optimizer, scaler, autocast, tc.clip)
            if not torch.isfinite(losses).all():                 # the update was skipped: weights are fine
                bad = [f"{t}={v:.4g}" for t, v in zip(dataset.tasks, losses[1:].tolist()) if not math.isfinite(v)]
                raise SystemExit(f"non-finite loss at step {step + 1} (epoch {epoch}): {', '.join(bad) or 'total'}; "
                                 f"stopped without saving, {path} holds the last good state")
            sums += losses
            seen += sum(len(b["images"]) for b in micro_batches) * world
            step += 1
            if clock:
                total = min(clock.after_step(step, tc, master, device.startswith("cuda")), tc.epochs * steps_per_epoch)
            if step % tc.log_every == 0 or step == total:
                if master:
                    elapsed = time.time() - t0
                    log(step, total, epoch, sums / (step - logged), dataset.tasks, optimizer, seen / elapsed,
                        elapsed / (step - start_step) * (total - step), tc)
                sums.zero_()
                logged = step
            if tc.save_every and step % tc.save_every == 0:
                save(epoch)
        del batches                                          # this epoch's workers end before the next start
        if step % steps_per_epoch == 0:                      # end of an epoch
            save(epoch + 1)
            if tc.eval_every and (epoch + 1) % tc.eval_every == 0:
                run_evaluation(raw, root, cfg, tokenizer, dataset.categories, tc, device, f"epoch{epoch + 1}")
    if step % steps_per_epoch:                               # stopped by --max-steps mid-epoch
        save(step // steps_per_epoch)
    if tc.demo:
        run_evaluation(raw, root, cfg, tokenizer, dataset.categories, tc, device, "final")
    mad.finish_processes()


def start_model(cfg, tc, dataset, device, ckpt):
    """The network (the same initial weights on every rank; ImageNet backbone weights for a new run of
    a paper preset) and AdamW with its parameter groups. -> (model, optimizer, what the weights are)."""
    torch.manual_seed(tc.seed)
    model = mad.build(cfg, dataset.vocab).to(device)
    weights = "random init"
    if (tc.pretrained or tc.backbone_weights) and ckpt is None:
        weights = load_backbone_weights(model.backbone, cfg.backbone, tc.backbone_weights or None)
    optimizer = torch.optim.AdamW(model.param_groups(tc.lr, tc.backbone_lr, tc.weight_decay),
                                  fused=device.startswith("cuda"))  # one kernel for the whole update
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]                               # lr_factor scales it at every step
    return model, optimizer, weights


def restore(ckpt, model, optimizer, scaler, tc, rank, device):
    """The checkpoint's weights, optimizer, GradScaler and this rank's RNG state (a rank the run did
    not have gets a stream of its own, seeded by its rank and the step). -> the step to continue at."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][rank], device)
    else:
        torch.manual_seed(tc.seed + rank + 1_000_003 * ckpt["step"])
    return ckpt["step"]


def epoch_batches(dataset, tc, epoch, start, rank, world, micro, device):
    """This process's batches of an epoch, from global position `start` on (rank_order)."""
    dataset.set_epoch(epoch)                                 # augmentation depends on (seed, epoch, index)
    order = rank_order(len(dataset), tc.seed, epoch, rank, world, start)
    return iter(torch.utils.data.DataLoader(dataset, micro, sampler=order, num_workers=tc.workers, collate_fn=pad_to_128,
                                            drop_last=True, pin_memory=device.startswith("cuda"),
                                            generator=torch.Generator().manual_seed(tc.seed + epoch)))


def pad_to_128(samples):
    """Training batches are padded to a multiple of 128 pixels: multi-scale images then come in a few
    batch shapes, and GPU libraries (cuDNN) reuse their per-shape plans instead of building new
    ones at almost every step."""
    return data.collate(samples, multiple=128)


def to_device(batch, device):
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in batch.items()}


def lr_factor(step, total, steps_per_epoch, tc):
    """Learning rate of optimizer step `step` (0-based) as a share of the base rate: a linear warm-up
    over tc.warmup steps, then either the paper's x0.1 drop at epoch tc.lr_drop or, after tc.hold
    steps at the full rate, a cosine to 0 at the last step."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    if tc.lr_schedule == "cosine":
        start = tc.warmup + tc.hold
        return 1.0 if step < start else 0.5 * (1 + math.cos(math.pi * (step - start) / max(total - start, 1)))
    return 0.1 if step >= tc.lr_drop * steps_per_epoch else 1.0


def train_step(model, raw, micro_batches, tasks, optimizer, scaler, autocast, clip):
    """One optimizer step over K micro-batches (K = 1 without accumulation). Returns the mean total
    and per-task losses (CPU, averaged over ranks); when any is non-finite the update is skipped.
    Eq. 1's normalizers are the counted positions of each (task, layer) over all ranks (their mean:
    DDP averages the gradients) and, with accumulation, over all K micro-batches, as one batch K
    times the size would be: those are counted first, in a no-grad pass whose random masks are
    replayed for the real one (one extra forward per micro-batch). With fp16, the GradScaler skips
    a step whose gradients overflow and lowers its scale."""
    K, device, normalizers = len(micro_batches), micro_batches[0]["images"].device, None
    ddp = model is not raw
    if K > 1:
        rng, counts = [], []
        for b in micro_batches:
            rng.append(rng_state(device))                    # the RNG state each micro-batch's masks start from
            with torch.no_grad(), autocast:
                counts.append(raw(b, tasks)[1])
        normalizers = {t: all_reduce_mean(sum(c[t] for c in counts)) / K for t in tasks}
    sums = torch.zeros(1 + len(tasks), device=device)
    for k, batch in enumerate(micro_batches):
        if K > 1:
            set_rng_state(rng[k], device)
        with (model.no_sync() if ddp and k < K - 1 else nullcontext()), autocast:
            nll, counts = model(batch, tasks)
            loss, parts = mad.weighted_loss(nll, normalizers or {t: all_reduce_mean(c) for t, c in counts.items()},
                                            raw.cfg.task_weights)
        scaler.scale(loss / K).backward()
        sums += torch.stack([loss.detach(), *(parts[t] for t in tasks)]).float() / K
    sums = all_reduce_mean(sums).cpu()                       # the same on every rank: all stop together
    if torch.isfinite(sums).all():
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums


def all_reduce_mean(x):
    """Average a tensor over DDP ranks (identity when not distributed): the loss normalizers."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def log(step, total, epoch, avg, tasks, optimizer, images_per_s, eta, tc):
    losses = dict(zip(("loss", *tasks), avg.tolist()))
    lr = optimizer.param_groups[0]["lr"]
    print(f"step {step}/{total} epoch {epoch} " + " ".join(f"{k} {v:.3f}" for k, v in losses.items())
          + f" lr {lr:.1e} {images_per_s:.1f} img/s ETA {eta / 60:.1f} min", flush=True)
    with open(os.path.join(tc.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=step, epoch=epoch, lr=lr, images_per_s=images_per_s, **losses)) + "\n")


def run_evaluation(model, root, cfg, tokenizer, categories, tc, device, name):
    """Every process predicts its share of val2017; rank 0 scores while the others wait for it on the
    side group (a long timeout), never inside a collective of the training's process group."""
    dataset = data.CocoMultiTask(root, "val2017", cfg, tokenizer, train=False, categories=categories, targets=False)
    out = os.path.join(tc.out, f"eval_{name}")
    metrics = evaluate.evaluate(model, dataset, tokenizer, out, batch_size=8, workers=min(tc.workers, 2),
                                max_images=tc.eval_images, show=tc.show, device=device)
    if metrics is not None:
        print(f"evaluation written to {out}", flush=True)
    mad.barrier()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
