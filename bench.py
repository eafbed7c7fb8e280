"""Benchmarks: MAD's speed and memory on this machine, and MAD vs the autoregressive baseline.

Measures what the paper claims (Table 2: parallel decoding 3953 ms -> 173 ms), each row in one run,
reported as ratios. Benchmarks print numbers; test_mad.py checks correctness. Never run as a test.

    python bench.py                 # the speed/memory table (tiny and r50, random weights, CPU)
    python bench.py --json          # the same numbers as JSON
    python bench.py --quick         # tiny rows only, one repetition (seconds; the test suite
                                    # runs it)
    python bench.py --device cuda   # GPU: latency of tiny/r50/swin_b in fp32 and bf16, r50 training
    python bench.py --device cuda --compile   # the same, every model through torch.compile (AR too)
    python bench.py --ablation      # paper Tables 2, 3, 7, 8 on the synthetic set, 2 seeds
                                    # (hours on 2 cores)
    python bench.py --ablation --tables 2 --seeds 0   # one table, one seed
    python bench.py --coco-scale    # annotations at COCO train2017's counts: load time,
                                    # memory per process
    python bench.py --tiny-variants # the demo's training images/s for variants of the tiny model
"""
import argparse
import io
import json
import os
import re
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import coco
import data
import evaluate
import mad
import runtime
from mad import MAD, PRESETS, TASKS, Config, Vocab


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps=3, device="cpu"):
    """Median wall time of fn() in seconds (after one warm-up call), synchronized on a GPU."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_peak(n=2048, reps=10):
    """This machine's fp32 matmul FLOP/s, the yardstick for model FLOP utilization."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, reps)


def build(preset, decoder="mad", num_classes=80, num_text=1000):
    torch.manual_seed(0)
    cfg = Config(**{**PRESETS[preset], "decoder": decoder})
    return mad.build(cfg, Vocab(num_classes, cfg.num_bins, num_text, person=0)).eval()


def image_batch(cfg, B=1, device="cpu"):
    """Images at the preset's test size: tiny 128 x 128, r50 800 x 1333 (padded to 32), with their
    padding mask and original sizes (predict's inputs)."""
    H, W = cfg.image_size, cfg.max_size
    Hp, Wp = -(-H // 32) * 32, -(-W // 32) * 32
    pad = torch.ones(B, Hp, Wp, dtype=torch.bool)
    pad[:, :H, :W] = False
    return (torch.randint(0, 256, (B, 3, Hp, Wp), dtype=torch.uint8).to(device), pad.to(device),
            torch.tensor([[H, W]] * B))


class TaskTimer:
    """Times model.predict, and per task model.encode and model.decode_sequences, and counts
    sequential decoder passes (decode, or the baseline's cached decode_step). On a GPU each part is
    synchronized (split=True), which serializes the queue, so the total is also timed without them
    (split=False)."""

    def __init__(self, model, device="cpu"):
        self.model, self.device, self.times, self.passes, self.split = model, device, {}, 0, True
        encode, decode_sequences = model.encode, model.decode_sequences

        def part(name, fn, *a, **k):
            if not self.split:
                return fn(*a, **k)
            sync(device)
            t = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            self.times[name] = self.times.get(name, 0) + time.perf_counter() - t
            return out

        def counted(fn):
            def call(*a, **k):
                self.passes += 1
                return fn(*a, **k)
            return call
        model.encode = lambda *a, **k: part("encode", encode, *a, **k)
        model.decode_sequences = lambda prompt, L, memory, task, *a, **k: part(
            task, decode_sequences, prompt, L, memory, task, *a, **k)
        for name in ("decode", "decode_step"):
            if hasattr(model, name):
                setattr(model, name, counted(getattr(model, name)))

    def run(self, *inputs):
        """Times predict (results left on the device), then moving its results to the CPU."""
        self.times, self.passes = {}, 0
        sync(self.device)
        t = time.perf_counter()
        out = self.model.predict(*inputs)
        sync(self.device)
        total, t = time.perf_counter() - t, time.perf_counter()
        [evaluate.to_cpu(p) for p in out]
        return dict(self.times, total=total, to_cpu=time.perf_counter() - t, passes=self.passes)


# masked inference as in the paper's Table 2: keypoints in 2 stages too (the default is one)
ROWS = [("MAD one stage", dict(kpt_ratios=(1.0,), cap_ratios=(1.0,))),
        ("MAD masked inference", dict(kpt_ratios=(1.0, 0.7))),
        ("AR + KV cache", dict(decoder="ar"))]


def inference_latency(preset, reps, device="cpu", dtype=None, compile=False):
    """Batch-1 latency per task and total: MAD one stage, MAD masked inference, AR + KV cache
    (one set of weights: the AR baseline loads MAD's; only the decoder and the stage ratios change;
    with `compile` all three run through torch.compile). Best of `reps` runs (AR: one)."""
    weights = build(preset).state_dict()
    gpu = str(device).startswith("cuda")
    rows = {}
    with torch.inference_mode(), torch.autocast(str(device).split(":")[0], dtype=dtype,
                                                enabled=dtype is not None):
        for k, (name, over) in enumerate(ROWS):
            model = build(preset, over.get("decoder", "mad"))
            model.load_state_dict(weights)
            model = model.to(device)
            for key, v in over.items():
                setattr(model.cfg, key, v)
            if compile:
                runtime.compile_model(model)
            inputs = image_batch(model.cfg, 1, device)
            timer = TaskTimer(model, device)
            if gpu or k == 0:
                timer.run(*inputs)                                 # warm-up (compilation)
            n = reps if "AR" not in name else 1
            rows[name] = min((timer.run(*inputs) for _ in range(n)), key=lambda r: r["total"])
            if gpu:
                timer.split = False
                rows[name].update(min((timer.run(*inputs) for _ in range(n)),
                                      key=lambda r: r["total"]))
    return rows


def decoder_vs_torch(reps):
    """Our decoder stack vs torch.nn.TransformerDecoder (same width, depth, heads, FFN, post-norm)
    on the same token counts: the detection sequence (1 x 506 tokens) and 100 segmentation
    sequences (100 x 262) against the memory of one 800 x 1333 image (25 x 42 tokens)."""
    cfg = Config()
    ours = MAD(cfg, Vocab(80, cfg.num_bins, 1000), backbone=(torch.nn.Identity(), 256)).eval()
    layer = torch.nn.TransformerDecoderLayer(cfg.d_model, cfg.heads, cfg.ffn, 0.0, batch_first=True)
    theirs = torch.nn.TransformerDecoder(layer, cfg.dec_layers,
                                         norm=torch.nn.LayerNorm(cfg.d_model)).eval()
    memory = torch.randn(1, 25 * 42, cfg.d_model)
    enc = mad.Memory(memory, memory, torch.ones(1, 1, 1, 25 * 42, dtype=torch.bool))
    rows = {}
    with torch.inference_mode():
        for name, n, L in [("det 1x506", 1, 506), ("seg 100x262", 100, 262)]:
            tokens = torch.randint(0, 100, (1, n, L))
            t_ours = timed(lambda: ours.decode(tokens, enc), reps)
            tgt = torch.randn(n, L, cfg.d_model)
            t_torch = timed(lambda: theirs(tgt, memory.expand(n, -1, -1)), reps)
            rows[name] = dict(ours_ms=1e3 * t_ours, torch_ms=1e3 * t_torch, ratio=t_ours / t_torch)
    return rows


def flops_of(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def random_train_batch(model, B, H, W):
    return coco.random_batch(model.cfg, model.vocab, B, H, W)


def model_flop_utilization(preset, peak, reps):
    """Achieved FLOP/s in inference (MAD masked inference) and one training step, vs the peak."""
    model = build(preset)
    inputs = image_batch(model.cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)          # FlopCounterMode's module hooks need this in inference
    with torch.no_grad():
        f = flops_of(lambda: model.predict(*inputs))
        t = timed(lambda: model.predict(*inputs), reps)
    for p in trainable:
        p.requires_grad_(True)
    out = dict(infer_gflop=f / 1e9, infer_pct_peak=100 * f / t / peak)
    model.train()
    batch = random_train_batch(model, 2, *inputs[2][0].tolist())
    step = lambda: model.loss(batch)[0].backward()
    f, t = flops_of(step), timed(step, reps)
    return dict(out, train_gflop=f / 1e9, train_pct_peak=100 * f / t / peak)


def training_throughput(preset, B, H, W, steps):
    """Runs in a child process, so that its peak RSS is the training step's own."""
    code = (f"import bench; bench.train_child({preset!r}, {B}, {H}, {W}, {steps})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_child(preset, B, H, W, steps):
    model = build(preset).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    batch = random_train_batch(model, B, H, W)

    def step():
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = timed(step, steps)
    print(json.dumps(dict(images_per_s=B / t, step_s=t, peak_rss_mib=peak_rss_mib())))


def peak_rss_mib():
    """This process's peak resident memory. (ru_maxrss would not do: Linux keeps it across the
    exec of a child, so a child would report its parent's peak.)"""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def bf16_autocast_on_cpu(reps):
    """A tiny training step (batch 8, 128 px) in fp32 vs under bf16 autocast (train.py --amp on
    CPU)."""
    model = build("tiny").train()
    batch = random_train_batch(model, 8, 128, 128)

    def step(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss, _ = model.loss(batch)
        loss.backward()
    fp32, bf16 = timed(lambda: step(None), reps), timed(lambda: step(torch.bfloat16), reps)
    return dict(fp32_s=fp32, bf16_s=bf16, ratio_bf16_to_fp32=bf16 / fp32)


def target_building_vs_jpeg(reps):
    """Building every task's targets of one 800 x 1333 image (train transform) vs decoding its
    JPEG."""
    import tempfile
    from PIL import Image
    with tempfile.TemporaryDirectory() as root:
        coco.make_synthetic_coco(root, 4, 0, image_size=800, seed=0, aspect=1333 / 800)
        cfg = Config(**PRESETS["r50"])
        # quiet: keeps --json clean
        ds = evaluate.quiet(data.CocoMultiTask, root, "train2017", cfg, None, True)
        path = os.path.join(root, "train2017", ds.ann.image(0)[0])
        jpeg = open(path, "rb").read()
        t_jpeg = timed(lambda: Image.open(io.BytesIO(jpeg)).convert("RGB").load(), reps)
        t_item = timed(lambda: ds[0], reps)
    return dict(jpeg_ms=1e3 * t_jpeg, getitem_ms=1e3 * t_item,
                targets_ms=1e3 * (t_item - t_jpeg),   # + resize
                ratio_targets_to_jpeg=(t_item - t_jpeg) / t_jpeg)


def backbones():
    """Full-model parameters (80 classes, 500 bins, the authors' 11,421 caption pieces) and the
    image side's forward time (backbone + encoder) per image at each preset's test size, batch 1."""
    rows = {}
    for preset in ("r50", "swin_b", "vit_b"):
        model = build(preset, num_text=11421)
        images, pad, _ = image_batch(model.cfg)
        with torch.inference_mode():
            t = timed(lambda: model.encode(images, pad), 1)
        rows[preset] = dict(
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            backbone_params_m=sum(p.numel() for p in model.backbone.parameters()) / 1e6,
            encode_s=t, size=list(images.shape[-2:]))
    return rows


def speed_table(reps, quick=False):
    """The CPU table; `quick`: the tiny rows only."""
    peak = matmul_peak(reps=2 if quick else 10)
    res = dict(device="cpu", threads=torch.get_num_threads(), matmul_peak_gflops=peak / 1e9)
    for preset in ("tiny",) if quick else ("tiny", "r50"):
        res[f"latency_{preset}"] = inference_latency(preset, reps)
        res[f"flop_utilization_{preset}"] = model_flop_utilization(
            preset, peak, reps if preset == "tiny" else 1)
    res["train_tiny_b8_128"] = training_throughput("tiny", 8, 128, 128, reps)
    res["bf16_autocast_cpu"] = bf16_autocast_on_cpu(reps)
    if not quick:
        res["decoder_vs_torch"] = decoder_vs_torch(reps)
        # batch 1 (batch 2: out of 24 GiB)
        res["train_r50_b1_800x1333"] = training_throughput("r50", 1, 800, 1333, 1)
        res["targets_vs_jpeg"] = target_building_vs_jpeg(5)
        res["backbones"] = backbones()
    return res


def training_step_on_gpu(preset, B, H, W, dtype, compile, steps):
    """One training step (forward, backward, fused AdamW) on a random batch: images/s, the share
    of the step the GPU is busy (kernel time in torch.profiler over the step's wall time), and the
    peak GPU memory."""
    model = build(preset).cuda().train()
    if compile:
        runtime.compile_model(model)
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=True)
    batch = {k: [t.cuda() for t in v] if isinstance(v, list) else v.cuda()
             for k, v in random_train_batch(model, B, H, W).items()}

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()                                                     # warm-up, compilation
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, steps, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type != torch.autograd.DeviceType.CPU]
    kernels = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                  for e in events) / 1e6
    return dict(step_s=t, images_per_s=B / t, gpu_busy=kernels / t, kernel_s=kernels,
                launches=sum(e.count for e in events),
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def gpu_table(reps, compile, quick=False):
    """The GPU table: synchronized batch-1 latency (fp32 with TF32, and bf16 autocast) and the r50
    training step at batch 2, 800 x 1333 (bf16 and fp32)."""
    runtime.cuda_settings()
    res = dict(device=torch.cuda.get_device_name(), compile=compile)
    for preset in ("tiny",) if quick else ("tiny", "r50", "swin_b"):
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            res[f"latency_{preset}_{precision}"] = inference_latency(
                preset, reps, "cuda", dtype, compile)
    preset, B, H, W = ("tiny", 8, 128, 128) if quick else ("r50", 2, 800, 1333)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        res[f"train_{preset}_b{B}_{H}x{W}_{precision}"] = training_step_on_gpu(
            preset, B, H, W, dtype, compile, reps)
    return res


def print_latency(rows, title):
    print(f"\n{title} (ms)")
    print(f"{'':22s}" + "".join(f"{k:>9s}" for k in ("encode", *TASKS, "total", "passes")))
    for name, r in rows.items():
        print(f"{name:22s}"
              + "".join(f"{1e3 * r.get(k, 0):9.1f}" for k in ("encode", *TASKS, "total"))
              + f"{r['passes']:9d}")
    ar, m1, mi = (rows["AR + KV cache"]["total"], rows["MAD one stage"]["total"],
                  rows["MAD masked inference"]["total"])
    print(f"AR / MAD one stage = {ar / m1:.1f}x, AR / MAD masked inference = {ar / mi:.1f}x; "
          f"moving MAD's results (masks at full size) to the CPU adds "
          f"{1e3 * rows['MAD masked inference']['to_cpu']:.1f} ms")


def print_gpu_table(res):
    print(f"{res['device']}, torch {torch.__version__}, "
          f"torch.compile {'on' if res['compile'] else 'off'}"
          f"; per-task columns synchronized, totals not")
    for key, rows in res.items():
        if key.startswith("latency_"):
            _, preset, precision = key.split("_", 2)
            print_latency(rows, f"inference latency, batch 1, {preset}, {precision}")
    for key, r in res.items():
        if key.startswith("train_"):
            print(f"\n{key}: {1e3 * r['step_s']:.0f} ms/step, {r['images_per_s']:.1f} images/s, "
                  f"GPU busy {100 * r['gpu_busy']:.0f}% ({1e3 * r['kernel_s']:.0f} ms of kernels, "
                  f"{r['launches']} launches), peak {r['peak_gib']:.1f} GiB")


def print_table(res):
    print(f"torch {torch.__version__}, {res['threads']} threads, "
          f"fp32 matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s")
    presets = [p for p in ("tiny", "r50") if f"latency_{p}" in res]
    for preset in presets:
        print_latency(res[f"latency_{preset}"], f"inference latency, batch 1, {preset}")
    if "decoder_vs_torch" not in res:                                          # --quick
        r = res["flop_utilization_tiny"]
        print(f"\ntiny: inference {r['infer_gflop']:.1f} GFLOP at {r['infer_pct_peak']:.0f}% "
              f"of matmul peak; training step {r['train_gflop']:.1f} GFLOP "
              f"at {r['train_pct_peak']:.0f}%")
        r = res["train_tiny_b8_128"]
        print(f"train_tiny_b8_128: {r['images_per_s']:.2f} images/s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
        return
    print("\ndecoder vs torch.nn.TransformerDecoder (inference, ms)")
    for name, r in res["decoder_vs_torch"].items():
        print(f"  {name:12s} ours {r['ours_ms']:8.1f}  torch {r['torch_ms']:8.1f}  "
              f"ratio {r['ratio']:.2f}x")
    for preset in ("tiny", "r50"):
        r = res[f"flop_utilization_{preset}"]
        print(f"\n{preset}: inference {r['infer_gflop']:.1f} GFLOP at {r['infer_pct_peak']:.0f}% "
              f"of matmul peak; training step {r['train_gflop']:.1f} GFLOP "
              f"at {r['train_pct_peak']:.0f}%")
    for key in ("train_tiny_b8_128", "train_r50_b1_800x1333"):
        r = res[key]
        print(f"{key}: {r['images_per_s']:.2f} images/s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    r = res["targets_vs_jpeg"]
    print(f"\n800x1333 image: JPEG decode {r['jpeg_ms']:.1f} ms, "
          f"target building {r['targets_ms']:.1f} ms "
          f"({r['ratio_targets_to_jpeg']:.2f}x the decode)")
    print("\nfull model per backbone (batch 1, backbone + encoder forward)")
    for name, r in res["backbones"].items():
        print(f"  {name:7s} {r['params_m']:6.1f}M parameters "
              f"({r['backbone_params_m']:.1f}M backbone), "
              f"{r['size'][0]}x{r['size'][1]}: {r['encode_s']:.2f} s")
    r = res["bf16_autocast_cpu"]
    print(f"tiny training step on CPU: fp32 {r['fp32_s']:.2f} s, bf16 autocast {r['bf16_s']:.2f} s "
          f"({r['ratio_bf16_to_fp32']:.2f}x)")


# -----------------------------------------------------------------------------
# COCO-scale data: annotation files at COCO train2017's counts, load time and memory

# train2017's counts
COCO_SCALE = dict(images=118_287, instances=860_001, persons=262_465, captions=591_753)
EXCERPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata",
                       "coco_val2017_excerpt")


def write_coco_scale(root, empty=False, counts=COCO_SCALE, files=8, size=640):
    """root/annotations/*_train2017.json at train2017's counts, made of the real val2017
    annotations in testdata/ (cycled over the images), over `files` real JPEGs (synthetic scenes,
    size x size) that the image entries share; empty: the same images, no annotations (the
    baseline of the memory)."""
    import random
    if os.path.exists(os.path.join(root, "annotations", "captions_train2017.json")):
        return
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "train2017"), exist_ok=True)
    rng = random.Random(0)
    for k in range(files):
        coco.draw_scene(rng, size, size)[0].save(
            os.path.join(root, "train2017", f"{k:03d}.jpg"), quality=90)
    n = counts["images"]
    images = [dict(id=i + 1, file_name=f"{i % files:03d}.jpg", width=size, height=size)
              for i in range(n)]
    source = {kind: json.load(open(os.path.join(EXCERPT, f"{kind}_val2017.json")))
              for kind in coco.FILES}
    for kind, count in (("instances", counts["instances"]), ("person_keypoints", counts["persons"]),
                        ("captions", counts["captions"])):
        anns = source[kind]["annotations"]
        out = [] if empty else [dict(anns[k % len(anns)], id=k + 1, image_id=k % n + 1)
                                for k in range(count)]
        extra = {"categories": source[kind]["categories"]} if kind != "captions" else {}
        with open(os.path.join(root, "annotations", f"{kind}_train2017.json"), "w") as f:
            json.dump(dict(images=images, annotations=out, **extra), f)


def private_mib(pid):
    """A process's private (unshared) memory: the pages it wrote since the fork, and its own."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(l.split()[1]) for l in f
                   if l.startswith(("Private_Clean", "Private_Dirty"))) / 1024


def coco_scale_child(root, batches, workers):
    """Load the annotations as train.py does (the r50 preset's dataset: multi-scale augmentation),
    then read `batches` batches of 2 with `workers` data-loader workers; prints a JSON line."""
    import multiprocessing
    import train
    cfg = Config(**PRESETS["r50"])
    tok = mad.CaptionTokenizer(data.train_caption_tokenizer(
        os.path.join(EXCERPT, "captions_val2017.json"), os.path.join(root, "spm"), 200))
    t = time.perf_counter()
    ds = evaluate.quiet(data.CocoMultiTask, root, "train2017", cfg, tok, True)
    load_s = time.perf_counter() - t
    order = train.rank_order(len(ds), 0, 0, 0, 1, 0)
    loader = torch.utils.data.DataLoader(ds, 2, sampler=order, num_workers=workers,
                                         collate_fn=train.pad_to_128)
    growth, first = {}, {}
    for k, _ in zip(range(batches), loader):
        if k in (0, batches // 5, batches // 2, batches - 1):
            mem = {p.pid: private_mib(p.pid) for p in multiprocessing.active_children()}
            first = first or mem
            growth[k + 1] = [round(mem[p] - first[p], 1) for p in sorted(first)]
    print(json.dumps(dict(load_s=load_s, peak_rss_mib=peak_rss_mib(), images=len(ds),
                          objects=len(ds.ann.obj_box), persons=len(ds.ann.person_box),
                          captions=len(ds.ann.cap_span), worker_growth_mib=growth)))


def coco_scale(root="data/coco_scale", batches=500, workers=4):
    """The COCO-scale data row: load time, main process peak RSS (with and without the annotations),
    and each worker's growth in private memory over `batches` batches."""
    t = time.perf_counter()
    for name, empty in (("", False), ("_empty", True)):
        write_coco_scale(root + name, empty)
    written = time.perf_counter() - t
    mib = sum(os.path.getsize(os.path.join(root, "annotations", f))
              for f in os.listdir(os.path.join(root, "annotations"))) / 2 ** 20
    res = {}
    for name in ("", "_empty"):
        code = f"import bench; bench.coco_scale_child({root + name!r}, {batches}, {workers})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        res[name or "full"] = json.loads(out.stdout.strip().splitlines()[-1])
    full, empty = res["full"], res["_empty"]
    print(f"COCO-scale annotations ({full['images']:,} images, {full['objects']:,} objects, "
          f"{full['persons']:,} persons with keypoints, {full['captions']:,} captions kept; "
          f"{mib:.0f} MiB of JSON; written in {written:.0f} s): "
          f"load {full['load_s']:.1f} s; main process peak RSS {full['peak_rss_mib']:.0f} MiB, "
          f"{full['peak_rss_mib'] - empty['peak_rss_mib']:.0f} MiB above the same run without "
          f"annotations; {workers} workers' growth in private memory (MiB) after batch " +
          "; ".join(f"{k}: {v}" for k, v in full["worker_growth_mib"].items()))
    return res


# -----------------------------------------------------------------------------
# Paper Tables 2, 3, 7 and 8 on the synthetic set: every training has the same budget

METRICS = ("bbox_AP", "segm_AP", "keypoints_AP", "BLEU4")
# the demo's plan, explicit: every training gets the same steps, whatever the machine's speed
# the tables' recipe: the tiny preset's 3 decoder layers, a 100-step warm-up, then the cosine
# (no hold), and no word shown in the fully masked caption copy (the details table's last row
# trains it)
ABLATION_PLAN = dict(batch_size=8, max_steps=1000, workers=1, dec_layers=3, hold=0,
                     cap_full_word=False)
# trainings: the demo's flags, then these
TRAININGS = {"ar": ["--decoder", "ar"], "parallel": ["--mask-ratio", "1.0"], "masked": [],
             "random_ratio": ["--mask-strategy", "random"],
             "multiple_ratios": ["--mask-strategy", "multiple"],
             "cap_full_word": ["--cap-full-word"],
             **{f"{t}_only": ["--tasks", t] for t in TASKS},
             **{f"{t}_only_parallel": ["--tasks", t, "--mask-ratio", "1.0"] for t in TASKS}}
ONE_STAGE = dict(kpt_ratios=(1.0,), cap_ratios=(1.0,))
# one single-task model per column
SEPARATE = lambda suffix: {t: f"{t}_only{suffix}" for t in TASKS}
# table -> row -> (training, or {task: training}; inference settings;
#                  the paper's ms, det, seg, kpt, cap)
TABLES = {
    "2": {"AR decoding": ("ar", {}, (3953, 27.9, 12.3, 33.4, 34.1)),
        "+ parallel decoding": ("parallel", ONE_STAGE, (137, 35.9, 29.8, 51.5, 18.2)),
        "+ masked training": ("masked", ONE_STAGE, (137, 38.9, 32.3, 54.6, 18.6)),
        "+ masked inference": ("masked", dict(kpt_ratios=(1.0, 0.7)),
                               (173, 38.9, 32.3, 54.7, 29.6))},
    "3": {"random ratio": ("random_ratio", {}, (None, 38.6, 31.9, 54.3, 29.4)),
        "multiple ratios": ("multiple_ratios", {}, (None, 38.6, 32.0, 54.2, 29.7)),
        "single ratio": ("masked", {}, (None, 38.9, 32.3, 54.7, 29.6))},
    "7": {"w/o masked inference": ("masked", dict(cap_ratios=(1.0,), tasks=("cap",)),
                                   (None, None, None, None, 18.6)),
        "{0.7}": ("masked", dict(cap_ratios=(1.0, 0.7), tasks=("cap",)),
                  (None, None, None, None, 25.8)),
        "{0.7, 0.3}": ("masked", dict(cap_ratios=(1.0, 0.7, 0.3), tasks=("cap",)),
                       (None, None, None, None, 27.0)),
        "{0.8, 0.6, 0.4}": ("masked", dict(tasks=("cap",)), (None, None, None, None, 29.6))},
    # segmentation and keypoints prompted by ground-truth boxes in every row (single-task models
    # have no detector)
    "8": {"separate (w/o MM)": (SEPARATE("_parallel"), dict(ONE_STAGE, oracle=True),
                                (None, 38.4, 31.2, 55.1, 20.6)),
        "separate (w/ MM)": (SEPARATE(""), dict(oracle=True), (None, 38.5, 32.1, 55.7, 30.4)),
        "joint (w/o MM)": ("parallel", dict(ONE_STAGE, oracle=True),
                           (None, 35.9, 29.8, 51.5, 18.2)),
        "joint (w/ MM)": ("masked", dict(oracle=True), (None, 38.9, 32.3, 54.7, 29.6))},
    # inference details, on the masked-training model (the paper: keypoint re-masking +0.1 AP);
    # the last row trains the authors' fully masked caption copy with one random word shown
    "inference": {
        "captions: running mean": ("masked", dict(remask_average="running"), (None,) * 5),
        "captions: (ensemble + new) / 2": ("masked", dict(remask_average="halve"), (None,) * 5),
        "keypoints: 2 stages (1.0, 0.7)": ("masked", dict(kpt_ratios=(1.0, 0.7)),
                                           (None, None, None, 54.7, None)),
        "keypoints: one stage": ("masked", dict(kpt_ratios=(1.0,)), (None, None, None, 54.6, None)),
        "score: softmax over classes, <noise>": ("masked", dict(det_score="classes"), (None,) * 5),
        "score: softmax over all det. tokens": ("masked", dict(det_score="all"), (None,) * 5),
        "full caption copy shows a word": ("cap_full_word", {}, (None,) * 5)},
}


def trained_steps(run_dir):
    """Steps in run_dir's checkpoint (0 without one): a run killed midway is resumed, not reused."""
    path = os.path.join(run_dir, "last.pt")
    return (torch.load(path, map_location="cpu", weights_only=True)["step"]
            if os.path.exists(path) else 0)


def ablation(out, tables, seeds):
    """Tiny models trained like `train.py --demo` with the same explicit budget (ABLATION_PLAN), one
    thread each, as many side by side as there are cores; then each table's rows evaluated on the
    synthetic val split at batch 1 (an evaluation shared by several rows runs once). Per row: the
    mean over the seeds and their spread (max - min), next to the paper's numbers."""
    import train
    flag = lambda k, v: ([f"--{'' if v else 'no-'}{k}"] if isinstance(v, bool)
                         else [f"--{k}", str(v)])
    demo = [x for k, v in {**train.DEMO, **ABLATION_PLAN}.items()
            if k not in ("out", "show", "eval_every") for x in flag(k.replace("_", "-"), v)]
    needed = {name for t in tables for training, _, _ in TABLES[t].values()
              for name in (training.values() if isinstance(training, dict) else [training])}
    runs = [(name, seed) for seed in seeds for name in sorted(needed)]
    todo = [r for r in runs
            if trained_steps(os.path.join(out, f"{r[0]}_s{r[1]}")) < ABLATION_PLAN["max_steps"]]
    runtime.prepare_data("synthetic")   # generated once, before the runs start
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running, start = {}, time.time()
    while todo or running:
        while todo and len(running) < (os.cpu_count() or 1):        # one run per core
            name, seed = todo.pop(0)
            run_dir = os.path.join(out, f"{name}_s{seed}")
            resume = ["--resume"] if trained_steps(run_dir) else []  # an interrupted run goes on
            with open(run_dir + ".log", "a") as log:                 # the child holds its own copy
                running[run_dir] = subprocess.Popen(
                    [sys.executable, "train.py", *demo, "--out", run_dir, "--seed", str(seed),
                     *TRAININGS[name], *resume],
                    cwd=os.path.dirname(os.path.abspath(__file__)), env=env, stdout=log,
                    stderr=subprocess.STDOUT)
            print(f"{(time.time() - start) / 60:5.1f} min: training {run_dir}", flush=True)
        time.sleep(5)
        for run_dir, p in list(running.items()):
            if p.poll() is not None:
                del running[run_dir]
                if p.returncode != 0:
                    raise SystemExit(f"training {run_dir} failed ({p.returncode}): "
                                     f"see {run_dir}.log")
    print(f"trainings done in {(time.time() - start) / 60:.1f} min", flush=True)
    cache, results = {}, {}
    for t in tables:
        for row, (training, settings, paper) in TABLES[t].items():
            per_seed = []
            for seed in seeds:
                by_task = training if isinstance(training, dict) else dict.fromkeys(TASKS, training)
                m = {}
                # each model once, for its columns
                for name in dict.fromkeys(by_task.values()):
                    key = (name, seed, json.dumps(settings, sort_keys=True))
                    if key not in cache:
                        cache[key] = evaluate_run(os.path.join(out, f"{name}_s{seed}"),
                                                  settings, out)
                    m.update({k: v for k, v in cache[key].items()
                              if k not in METRICS or by_task[TASKS[METRICS.index(k)]] == name})
                per_seed.append(m)
            # several models or passes: no one time
            if isinstance(training, dict) or settings.get("oracle"):
                per_seed = [{k: v for k, v in m.items() if k != "ms_per_image"} for m in per_seed]
            results[f"table{t}/{row}"] = dict(paper=paper, seeds=per_seed)
        print_ablation_table(t, {row: results[f"table{t}/{row}"] for row in TABLES[t]}, seeds)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


INFERENCE_FIELDS = ("kpt_ratios", "cap_ratios", "remask_average", "det_score", "seg_topk")


def evaluate_run(run_dir, settings, out):
    """The metrics of one trained model under inference settings (cfg fields). oracle: segmentation
    and keypoints prompted by ground-truth boxes, evaluated apart from detection and captions
    (evaluate.py prompts them so when a model has no detection task)."""
    ckpt = runtime.load_checkpoint(os.path.join(run_dir, "last.pt"))
    settings = dict(settings)
    oracle = settings.pop("oracle", False)
    # the model is built under the settings: it chooses its variants (det_score ...) when built
    model, tokenizer = runtime.model_from_checkpoint(
        dict(ckpt, config={**ckpt["config"], **settings}))
    trained, metrics = model.cfg.tasks, {}
    for tasks in (("det", "cap"), ("seg", "kpt")) if oracle else (trained,):
        model.cfg.tasks = tuple(t for t in trained if t in tasks)
        if not model.cfg.tasks:
            continue
        ds = data.CocoMultiTask(runtime.SYNTHETIC["root"], "val2017", model.cfg, tokenizer,
                                train=False, categories=ckpt["categories"], targets=False)
        name = (os.path.basename(run_dir)
                + "".join(f"_{k}{v}" for k, v in sorted(settings.items()))
                + "_" + "".join(tasks))
        eval_dir = os.path.join(out, "eval", re.sub(r"[^\w.-]", "", name))
        # an earlier evaluation of this very checkpoint under the same inference settings,
        # defaults included
        inference = json.loads(json.dumps({k: getattr(model.cfg, k) for k in INFERENCE_FIELDS}))
        done, used = (os.path.join(eval_dir, "metrics.json"),
                      os.path.join(eval_dir, "inference.json"))
        if (os.path.exists(done) and os.path.exists(used) and json.load(open(used)) == inference
                and os.path.getmtime(done) > os.path.getmtime(os.path.join(run_dir, "last.pt"))):
            metrics.update(json.load(open(done)))
        else:
            metrics.update(evaluate.evaluate(model, ds, tokenizer, eval_dir,
                                             batch_size=1, workers=1))
            with open(used, "w") as f:
                json.dump(inference, f)
    return metrics


def print_ablation_table(t, rows, seeds):
    print(f"\n{'Paper Table ' + t if t.isdigit() else 'Details'} on the synthetic val split "
          f"(200 images): tiny, {ABLATION_PLAN['max_steps']} steps of "
          f"batch {ABLATION_PLAN['batch_size']} each, mean over seeds {seeds} (spread max - min)")
    print(f"{'':36s}{'ms/img':>8s}" + "".join(f"{c:>13s}" for c in ("det", "seg", "kpt", "cap"))
          + "   | paper")
    for row, r in rows.items():
        cells = []
        for k in ("ms_per_image", *METRICS):
            values = [m[k] for m in r["seeds"] if k in m]
            mean = sum(values) / len(values) if values else None
            spread = max(values) - min(values) if len(values) > 1 else 0.0
            cells.append(f"{'-':>8s}" if mean is None else f"{mean:8.1f}" if k == "ms_per_image"
                         else f"{mean:7.1f} ±{spread / 2:4.1f}")
        print(f"{row:36s}" + cells[0] + "".join(f"{c:>13s}" for c in cells[1:]) + "   | "
              + ", ".join("-" if x is None else str(x) for x in r["paper"]))


# -----------------------------------------------------------------------------
# The demo's levers: training images/s of tiny variants on the demo's own batches

TINY_VARIANTS = {"tiny preset": {}, "decoder 2 layers (demo)": dict(dec_layers=2),
                 "encoder 1, decoder 2": dict(enc_layers=1, dec_layers=2),
                 "encoder 3, decoder 4": dict(enc_layers=3, dec_layers=4),
                 "d 96": dict(d_model=96), "d 192": dict(d_model=192, heads=6),
                 "FFN 256": dict(ffn=256), "FFN 1024": dict(ffn=1024)}


def tiny_variants(rounds=4, steps=10, batch=8):
    """Training steps (batch 8, 128 px, no augmentation: the demo's) of every variant, in rounds
    that take turns, so that each variant meets the same machine speed; the first round's first 5
    steps of each are warm-up. Same batches for all (the synthetic train split, a fixed order)."""
    import contextlib
    import tempfile
    import train
    root = runtime.prepare_data("synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        spm = data.train_caption_tokenizer(
            os.path.join(root, "annotations", "captions_train2017.json"),
            os.path.join(tmp, "spm"), train.SCHEDULES["tiny"]["spm_vocab"])
        tokenizer = mad.CaptionTokenizer(spm)
    cfg = Config(**PRESETS["tiny"])
    ds = evaluate.quiet(lambda: data.CocoMultiTask(root, "train2017", cfg, tokenizer, True,
                                                   augment=False))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [data.collate([ds[i] for i in order[k * batch:(k + 1) * batch]])
               for k in range(rounds * steps)]
    runs = {}
    for name, change in TINY_VARIANTS.items():
        torch.manual_seed(0)
        model = MAD(Config(**{**PRESETS["tiny"], **change}), ds.vocab)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), [])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for r in range(rounds):
        for model, optimizer, times in runs.values():
            for k, b in enumerate(batches[r * steps:(r + 1) * steps]):
                t = time.perf_counter()
                train.train_step(model, model, [b], model.cfg.tasks, optimizer, scaler,
                                 contextlib.nullcontext(), 1.0)
                if r > 0 or k >= 5:
                    times.append(time.perf_counter() - t)
    res = {name: dict(params_m=sum(p.numel() for p in m.parameters()) / 1e6,
                      images_per_s=batch * len(t) / sum(t))
           for name, (m, _, t) in runs.items()}
    base = res["tiny preset"]["images_per_s"]
    print(f"training images/s, batch {batch}, 128 px, {torch.get_num_threads()} threads "
          f"({rounds} rounds of {steps} steps)")
    for name, r in res.items():
        print(f"  {name:22s} {r['params_m']:5.2f}M parameters {r['images_per_s']:6.1f} images/s  "
              f"{r['images_per_s'] / base:4.2f}x")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny rows only, one repetition (seconds)")
    p.add_argument("--compile", action="store_true",
                   help="--device cuda: every model through torch.compile")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--ablation", action="store_true",
                   help="paper Tables 2, 3, 7, 8 on the synthetic set")
    p.add_argument("--tables", default="2,3,7,8,inference", help="--ablation: which tables")
    p.add_argument("--seeds", default="0,1", help="--ablation: training seeds of every row")
    p.add_argument("--out", default="runs/ablation", help="--ablation: models and evaluations")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per row (default 3; --quick 1)")
    p.add_argument("--coco-scale", action="store_true",
                   help="annotations at COCO train2017's counts: load time, memory")
    p.add_argument("--tiny-variants", action="store_true",
                   help="the demo's training images/s for tiny variants")
    args = p.parse_args()
    if args.tiny_variants:
        return tiny_variants()
    if args.coco_scale:
        return coco_scale()
    if args.ablation:
        return ablation(args.out, args.tables.split(","), [int(s) for s in args.seeds.split(",")])
    reps = args.reps or (1 if args.quick else 3)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        res = gpu_table(reps, args.compile, args.quick)
        print(json.dumps(res, indent=1)) if args.json else print_gpu_table(res)
    else:
        res = speed_table(reps, args.quick)
        print(json.dumps(res, indent=1)) if args.json else print_table(res)


if __name__ == "__main__":
    main()
