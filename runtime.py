"""
The run, written once for every recipe: setup (threads, DDP, autocast, seed, run dir, checkpoint config),
model wrapping (compile, then DDP), optimizers and the LR schedule, the training clock, DDP-aware means,
log lines, the Logger (eval lines, results.json, a per-eval JSONL log, wandb) and teardown.
The training loop itself stays in each train_<recipe>.py, where it can be read.
"""
import gc
import json
import math
import netrc
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from checkpoint import adopt_checkpoint_config, check_repo_id, load_meta, push_run_to_hub, run_dir
from data import format_metrics, git_commit, write_results
from model import InputError


def install_error_hook():
    """Scripts call this first: an InputError (or a missing file) prints one line instead of a traceback
    (VLM_TRACEBACK=1 shows the traceback)."""
    default_hook = sys.excepthook

    def hook(kind, err, tb):
        if isinstance(err, (InputError, FileNotFoundError)) and not os.environ.get("VLM_TRACEBACK"):
            print(f"error: {err}", file=sys.stderr)
        else:
            default_hook(kind, err, tb)
    sys.excepthook = hook

# -----------------------------------------------------------------------------
# setup: one call at the top of every script


@dataclass
class Run:
    """What setup() found and decided; every script reads the same names from it."""
    ddp: bool               # launched by torchrun
    rank: int
    local_rank: int
    world_size: int
    device: str             # 'cpu', 'cuda:0', ...
    device_type: str        # 'cpu' | 'cuda'
    dtype: str              # 'float32' | 'bfloat16': the autocast dtype of ctx
    ctx: object             # autocast context for forward passes
    threads: int
    out_dir: str
    resume: bool            # init_from == 'resume'
    ckpt_src: str = None    # the checkpoint this run starts from (None: scratch)
    meta: dict = field(default_factory=dict)  # that checkpoint's meta.json

    @property
    def master(self):
        return self.rank == 0

    def matmul_peak(self):
        """The measured matmul FLOP/s at this run's dtype: what every MFU is printed against."""
        return measure_matmul_peak(self.device, getattr(torch, self.dtype))


def setup(config, recipe, model_keys=(), absent=None):
    """Threads, DDP (from torchrun's environment), autocast, seed (seed + rank), the run dir and the checkpoint
    to start from. A checkpoint's model_keys override config (each change printed) and out_dir is filled in,
    in config itself: the script then takes them with globals().update(config).
    absent: {key: value} (or meta -> dict) an older checkpoint whose config lacks the key was built with."""
    if config.get("push_to_hub"):
        check_repo_id(config["push_to_hub"])  # a malformed repo name fails now, not after the training
    threads = pick_threads(config.get("torch_threads", 0))
    torch.set_num_threads(threads)
    device = resolve_device(config.get("device", "auto"))
    rank, local_rank, world = 0, 0, 1
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx, dtype = autocast_ctx(device_type, config.get("dtype", "auto"))
    seed = config.get("seed", 0) + rank  # each rank its own noise stream
    torch.manual_seed(seed)
    np.random.seed(seed)
    init_from = config.get("init_from", "scratch")
    out_dir = run_dir(config.get("out_dir", ""), recipe, init_from)
    config["out_dir"] = out_dir
    run = Run(ddp, rank, local_rank, world, device, device_type, dtype, ctx, threads, out_dir, init_from == "resume")
    if init_from != "scratch":  # resume, a checkpoint dir, or hf:owner/name
        run.ckpt_src = os.path.join(out_dir, "ckpt") if run.resume else init_from
        run.meta = load_meta(run.ckpt_src)
        if run.meta.get("recipe", recipe) != recipe:
            raise InputError(f"init_from={init_from!r} is a {run.meta['recipe']!r} checkpoint, not {recipe!r}")
        absent = absent(run.meta) if callable(absent) else absent
        adopt_checkpoint_config(run.meta, config, model_keys, verbose=run.master, absent=absent)
    return run


def pick_threads(torch_threads=0):
    """torch_threads > 0 as asked; 0: OMP_NUM_THREADS if set (torchrun sets 1), else the machine's cores divided
    among the processes on this node. Never the idle cores at start: a run must not depend on the load."""
    if torch_threads > 0:
        return torch_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; asking for CUDA without one is a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); use --device=cpu or --device=auto")
    return device


TEARDOWN_WARNING = "a DDP wrapper is still alive at teardown"


def cleanup_distributed():
    """End of a DDP run: wait until every rank is done (rank 0 may still be evaluating), then tear down.
    Drop the DDP wrapper first (`model = unwrap(model)`): its reducer holds the process group, and a gloo group
    that outlives destroy_process_group is freed at interpreter exit, where it sometimes aborts the process
    ("terminate called without an active exception") after a run that otherwise finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        # issubclass(type(o)) and not isinstance(o): isinstance reads o.__class__, which wakes deprecated proxies
        if any(issubclass(type(o), torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
            print(f"warning: {TEARDOWN_WARNING}: drop it before cleanup_distributed() (model = unwrap(model))",
                  file=sys.stderr, flush=True)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def autocast_ctx(device_type, dtype="auto"):
    """bf16 autocast on CUDA; on CPU fp32 unless dtype='bfloat16' is asked for."""
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext(), "float32"
    if dtype != "bfloat16":
        raise InputError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16), "bfloat16"


def maybe_compile(model, compile, device_type):
    """torch.compile when asked, on any device (inductor: Triton kernels on CUDA, C++ on CPU, where the cold
    start costs more than tiny runs gain: the CPU defaults leave it off)."""
    return torch.compile(model) if compile else model


def sync_grads(model, micro, grad_accum_steps):
    """Gradient accumulation under DDP: its gradient all-reduce belongs to the last micro-batch's backward only
    (no_sync() on the others, forward and backward inside it). A no-op without DDP."""
    if micro < grad_accum_steps - 1 and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def wrap(model, compile, run, **ddp_kwargs):
    """The model the loop trains: torch.compile (when asked), then DDP under torchrun.
    Keep the plain module for eval, saving and generation (raw_model)."""
    model = maybe_compile(model, compile, run.device_type)
    if run.ddp:
        device_ids = [run.local_rank] if run.device_type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    return model


# -----------------------------------------------------------------------------
# optimizers and the LR schedule


def configure_optimizers(model, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", optimizer="adamw"):
    """AdamW with weight decay on matrices (dim >= 2) only; the fused kernel on CUDA and CPU (one pass per
    tensor instead of ~8 elementwise ops: measurable on CPU, where the optimizer is memory-bound).
    optimizer='muon': the hidden matrices (muon_matrices) take Muon at the same lr, the rest AdamW."""
    if optimizer not in ("adamw", "muon"):
        raise InputError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
    hidden = muon_matrices(model) if optimizer == "muon" else []
    params = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in hidden)]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    extra = dict(fused=True) if device_type in ("cuda", "cpu") else {}
    adamw = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
    if not hidden:
        return adamw
    return OptimizerPair(adamw, Muon(hidden, lr=lr, weight_decay=weight_decay))


def muon_matrices(model, min_dim=16):
    """The weights Muon is for: matrices of nn.Linear layers, both sides >= min_dim (not the output heads of one
    or two units), and not the vocabulary head (embeddings are nn.Embedding / nn.Parameter: never listed)."""
    found = {id(m.weight): m.weight for name, m in model.named_modules()  # by id: a shared weight counts once
             if isinstance(m, nn.Linear) and isinstance(m.weight, nn.Parameter)  # not a LoRA-computed weight
             and m.weight.requires_grad and min(m.weight.shape) >= min_dim
             and not name.endswith("lm_head")}
    return list(found.values())


def orthogonalize(g, steps=5):
    """Newton-Schulz iteration (B, m, n) -> ~U V^T of each matrix's SVD: every singular value pushed towards 1
    (the quintic's coefficients trade exactness, ~0.7-1.2, for speed). Runs on the wide side (m <= n)."""
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the basin
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum whose update is orthogonalised (Newton-Schulz), for 2-D hidden weights: every direction of the
    update moves at the same rate, so the rare directions learn as fast as the common ones. Each update is
    scaled to an RMS of update_rms (x lr) whatever the matrix's shape, so one lr and schedule serve Muon and
    AdamW; decoupled weight decay. Matrices of one shape are orthogonalised together (one batched matmul)."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5, update_rms=0.5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, update_rms=update_rms))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "momentum" not in self.state[p]:  # (setdefault would allocate a zero tensor on every step)
                    self.state[p]["momentum"] = torch.zeros_like(p)
                buf = self.state[p]["momentum"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, g))
            for (m, n), items in by_shape.items():
                # an m x n matrix with unit singular values has RMS 1 / sqrt(max(m, n)): rescale to update_rms
                update = orthogonalize(torch.stack([g for _, g in items]), group["ns_steps"])
                update *= group["update_rms"] * max(m, n) ** 0.5
                for (p, _), u in zip(items, update):
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(u.to(p.dtype), alpha=-group["lr"])


class OptimizerPair:
    """Two optimizers stepped as one (AdamW + Muon): one param_groups list (set_lr reaches both), one state dict."""

    def __init__(self, first, second):
        self.optimizers = (first, second)

    @property
    def param_groups(self):
        # read afresh each time: load_state_dict gives each optimizer new group dicts, and a list built once
        # would keep the old ones, so set_lr after a resume changed nothing (the run kept the checkpoint's LR)
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return dict(pair=[o.state_dict() for o in self.optimizers])

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["pair"]):
            o.load_state_dict(s)


def get_lr(step, max_steps, lr, warmup_steps=0, min_lr_frac=0.1):
    """Linear warmup, then cosine decay to min_lr_frac * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr

# -----------------------------------------------------------------------------
# the memory plan (--plan=True): what a training step holds per process, and the micro-batch that fits a GPU
# Method: parameters, gradients and optimizer state counted exactly; activations traced on real steps (the bytes
# autograd saves for the backward, counted once per storage by saved-tensor hooks) at the run's micro-batch and
# scaled per sample. A step's transient buffers are not counted (tests/test_memory_plan.py: within 15% of a
# measured peak on CPU).


class SavedBytes:
    """Context: counts the bytes autograd saves for the backward inside it, each storage once, parameters not
    (they are counted as parameters; a bf16 copy autocast saves is counted: it is extra memory)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and key not in self.params:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def static_bytes(model, optimizer):
    """Exact bytes of parameters (+ buffers), their gradients (trainable ones) and the optimizer's state tensors
    (after its first step; before it, AdamW's two moments are counted per trainable parameter)."""
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opts = getattr(optimizer, "optimizers", [optimizer])
    state = sum(v.numel() * v.element_size() for o in opts for st in o.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return dict(parameters=params, gradients=grads, optimizer=state or 2 * 4 * sum(p.numel() for p in trainable))


class MemoryPlan:
    """--plan=True: traces the run's first two steps, the first without activation checkpointing, the second with
    it (the same gradients), then prints the plan; the script stops there. Run it eager (compile adds no saved
    activations; the plan is then an upper bound). kv_cache_bytes: what the eval's generation cache takes."""

    def __init__(self, run, model, optimizer, micro_batch, grad_accum_steps, gpu_gib=0.0, kv_cache_bytes=0,
                 checkpointing=False):
        self.run, self.model, self.optimizer, self.checkpointing = run, model, optimizer, checkpointing
        self.micro_batch, self.global_batch = micro_batch, micro_batch * grad_accum_steps * run.world_size
        visible = torch.cuda.get_device_properties(run.device).total_memory / 2**30 if run.device_type == "cuda" else 0
        self.gpu_gib = gpu_gib or visible or 80.0
        self.kv_cache_bytes, self.activations, self.counter = kv_cache_bytes, [], None

    def probe(self):
        """Context for each micro-batch's forward and backward."""
        from model import set_checkpointing
        if len(self.activations) >= 2:
            return nullcontext()
        set_checkpointing(self.model, len(self.activations) == 1)
        self.counter = SavedBytes(self.model)
        return self.counter

    def done(self):
        """After a step: True once, when the plan has just been printed."""
        from model import set_checkpointing
        if len(self.activations) >= 2:
            return False
        self.activations.append(self.counter.bytes)  # the step's last micro-batch (each frees its own)
        if len(self.activations) < 2:
            return False
        set_checkpointing(self.model, self.checkpointing)
        if self.run.master:
            self.report()
        return True

    def report(self):
        gib = 2**30

        def size(n):
            return f"{n / gib:8.2f} GiB" if n >= gib / 4 else f"{n / 2**20:8.1f} MiB"
        static = static_bytes(self.model, self.optimizer)
        fixed = sum(static.values())
        budget = 0.9 * self.gpu_gib * gib - fixed  # 10% left to the allocator's fragmentation and workspaces
        print(f"memory plan per process (micro-batch {self.micro_batch}, global batch {self.global_batch}, "
              f"{self.run.world_size} process(es), {self.run.dtype}; activations traced, the rest counted):")
        for k, v in static.items():
            print(f"  {k:<28} {size(v)}")
        for name, act in zip(("activations", "activations, checkpointed"), self.activations):
            per_rank = self.global_batch // self.run.world_size
            fit = max(0, int(budget // (act / self.micro_batch))) if act else per_rank  # samples per micro-batch
            accum = -(-per_rank // fit) if fit else 0
            plan = f"micro-batch {-(-per_rank // accum)} x {accum} accumulation steps" if fit else "does not fit"
            print(f"  {name:<28} {size(act)}  -> peak ~{size(fixed + act).strip()}; on {self.gpu_gib:.0f} GiB: {plan}")
        if self.kv_cache_bytes:
            print(f"  {'eval KV cache':<28} {size(self.kv_cache_bytes)} (at most: the eval batch x the GPT's "
                  f"sequence_len; generation, after training frees gradients and activations)")


def plan_probe(planner):
    """The traced context of a MemoryPlan, or nothing."""
    return planner.probe() if planner else nullcontext()


def kv_cache_bytes(gpt_config, batch, seq_len, dtype_bytes=2):
    """A generation KV cache: keys and values per layer, kv heads x head_dim each."""
    c = gpt_config
    return 2 * batch * c.n_kv_head * seq_len * (c.n_embd // c.n_head) * c.n_layer * dtype_bytes


# -----------------------------------------------------------------------------
# the training clock, speed, DDP-aware means


class Clock:
    """Training seconds: only the steps count (never eval or checkpoints), and a resume continues them (saved as
    meta['train_seconds']). budget > 0 is an opt-in wall-clock cap (a default run is step-exact): the LR then
    decays on whichever of steps and seconds is further along, and every rank stops at the same step."""

    def __init__(self, budget=0.0, seconds=0.0, device="cpu"):
        self.budget, self.seconds, self.device = budget, float(seconds), device
        self.t0 = None

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        """End of a step: its seconds (device synced) are added and returned."""
        sync(self.device)
        dt = time.perf_counter() - self.t0
        self.seconds += dt
        return dt

    def lr_step(self, step, max_steps):
        return budget_lr_step(step, max_steps, self.seconds, self.budget, self.device)

    def spent(self):
        return budget_spent(self.seconds, self.budget, self.device)


def budget_lr_step(step, max_steps, seconds, budget_s, device="cpu"):
    """The step the LR schedule uses under a wall-clock training budget (budget_s > 0): whichever of steps and
    seconds is further along, so a slow (shared) CPU still ends on a fully decayed LR. Under DDP rank 0's clock
    decides for every rank (or the replicas' LRs, then weights, drift apart). budget_s <= 0: the step itself,
    and the run is exactly reproducible."""
    if budget_s <= 0:
        return step
    s = torch.tensor([max(step, int(max_steps * seconds / budget_s))], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(s, 0)
    return min(int(s), max_steps)


def budget_spent(seconds, budget_s, device="cpu"):
    """True on every rank as soon as any rank has used the training budget, so all ranks stop at one step."""
    if budget_s <= 0:
        return False
    flag = torch.tensor([float(seconds >= budget_s)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def measure_matmul_peak(device="cpu", dtype=torch.float32, n=1024, seconds=0.25, trials=5):
    """Measured (not datasheet) matmul FLOP/s, the best of `trials` short runs: the denominator of every MFU
    this repo prints. Measured at start-up, so a machine busier then than later can still print MFU > 100%."""
    gen = torch.Generator(device=device).manual_seed(0)  # its own RNG: measuring never shifts a resumed run's
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(trials):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / trials:
            a @ b
            iters += 1
        sync(device)
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def mean_across_ranks(value, device="cpu"):
    """The mean of a scalar over DDP ranks: every rank must call it. Logging it makes a 2-process run print the
    same loss as one process on the same global batch (rank 0's own loss is only half the batch)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def global_mean(loss_sum, count, device="cpu"):
    """A summed per-token loss -> its mean over the GLOBAL batch's tokens, scaled so that DDP's gradient
    averaging reproduces one process's gradient exactly. (Each rank's own mean would weight a rank with fewer
    target tokens too much whenever sequence lengths differ.)"""
    count = torch.as_tensor(count, dtype=torch.float32, device=device).reshape(1)
    # no collective without grad: eval runs on rank 0 alone and must never wait for the other ranks
    if not (torch.distributed.is_available() and torch.distributed.is_initialized() and torch.is_grad_enabled()):
        return loss_sum / count.clamp(min=1).squeeze()
    count = count.clone()
    torch.distributed.all_reduce(count)
    return loss_sum * torch.distributed.get_world_size() / count.clamp(min=1).squeeze()


def grad_norm(module):
    """L2 norm of a module's gradients, before clipping (0.0 when none reached it): a diagnostic to log."""
    norms = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def check_finite(loss, step):
    """A NaN/inf loss stops the run (the last checkpoint on disk is kept)."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; the last saved checkpoint is kept")


def log_line(step, max_steps, loss, lr, dt, tokens=None, flops_per_step=None, peak=None, extra=""):
    """One line per log interval: step 100/2000 | loss 0.512 | lr 3.0e-04 | 41 ms | 9.8k tok/s | mfu 31%"""
    s = f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.1e} | {dt * 1000:.0f} ms"
    if tokens:
        s += f" | {tokens / dt / 1000:.1f}k tok/s"
    if flops_per_step and peak:
        s += f" | mfu {100 * flops_per_step / dt / peak:.0f}%"
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process's peak so far (its own GPU)
        s += f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return s + (f" | {extra}" if extra else "")

# -----------------------------------------------------------------------------
# logging and teardown


class Logger:
    """Where a run's numbers go. eval(): the target metrics on one short line, a second line of the diagnostics
    named, and everything into results.json, <out_dir>/evals.jsonl (one record per eval) and wandb.
    wandb only when asked (wandb_log=True, master rank); without a login it logs offline and says so."""

    def __init__(self, run, recipe, config, wandb_log=False, project="", run_name=""):
        self.run, self.recipe, self.config, self.wb = run, recipe, config, None
        self.git = git_commit()  # the code the run started with (HEAD may move while it trains)
        if wandb_log and run.master:
            try:
                import wandb
            except ImportError:
                raise InputError("wandb_log=True but wandb is not installed (pip install wandb)") from None
            if not os.environ.get("WANDB_MODE") and not wandb_logged_in():
                os.environ["WANDB_MODE"] = "offline"
                print(f"wandb: no login found (WANDB_API_KEY or `wandb login`): logging offline to "
                      f"{run.out_dir}/wandb (upload later with `wandb sync`)")
            self.wandb = wandb
            self.wb = wandb.init(project=project, name=run_name, config=config, dir=run.out_dir)

    def log(self, scalars, step, images=None):
        if self.wb is None:
            return
        data = dict(scalars)
        for name, path in (images or {}).items():
            if path:  # None: that picture was not drawn
                data[name] = self.wandb.Image(path)
        self.wb.log(data, step=step)

    def eval(self, step, metrics, targets, diagnostics=(), note="", images=None, split="val", n_eval=0, **fields):
        """Prints, writes results.json and evals.jsonl, logs to wandb. Returns results.json's dict."""
        head = [f"{k} {metrics[k]:.4g} ({op} {thr})" for k, (op, thr) in targets.items() if k in metrics]
        res = write_results(self.run.out_dir, self.recipe, split, n_eval, metrics, targets, step=step,
                            device=self.run.device, dtype=self.run.dtype, config=self.config, git=self.git, **fields)
        print(f"eval step {step} | " + " | ".join(head) + f" | {'met' if res['met'] else 'NOT met'}")
        shown = {k: metrics[k] for k in diagnostics if k in metrics}
        if shown or note:
            print("  " + " | ".join(filter(None, [format_metrics(shown), note])))
        with open(os.path.join(self.run.out_dir, "evals.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=step, split=split, n_eval=n_eval, met=res["met"], metrics=res["metrics"],
                                    **fields), default=str) + "\n")
        self.log(metrics, step, images)
        return res

    def finish(self):
        if self.wb is not None:
            self.wb.finish()


def wandb_logged_in():
    """A wandb API key in the environment or in ~/.netrc (where `wandb login` writes it); no network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def teardown(logger, push_to_hub=""):
    """End of a run: the Hub upload if asked (master), wandb closed, DDP torn down. Drop the DDP wrapper first
    (`model = unwrap(model)`): its reducer holds the process group."""
    if push_to_hub and logger.run.master:
        push_run_to_hub(push_to_hub, logger.run.out_dir, logger.recipe, logger.config)
    logger.finish()
    cleanup_distributed()
