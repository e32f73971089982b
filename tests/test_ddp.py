"""A 2-process gloo DDP step (through runtime.setup and runtime.wrap, and torchrun's environment variables) gives the
same gradients as one process on the same global batch, and the ranks' data shards come from
data.batch_indices."""
import json
import math
import os
import socket
import time

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn as nn

WORLD, B, T = 2, 3, 10


def build_model():
    import model as M
    import runtime as R
    import checkpoint as C
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, sequence_len=32))
    for mod in m.modules():  # random residual projections, so every parameter gets a gradient
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=1.0 / math.sqrt(mod.weight.shape[1]))
    return m


def rows(indices):
    import data
    return torch.as_tensor(np.stack([data.sample_rng(0, "train", i).integers(0, 64, T + 1) for i in indices]))


def worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import data
    import model as M
    import runtime as R
    import checkpoint as C
    from torch.nn.parallel import DistributedDataParallel as DDP
    run = R.setup(dict(device="cpu", torch_threads=1, seed=0, out_dir=str(out_dir)), "ddp-test")
    assert run.ddp and run.rank == rank and run.world_size == WORLD and run.device == "cpu"
    assert run.master == (rank == 0) and torch.distributed.get_backend() == "gloo"
    m = build_model()
    ddp = R.wrap(m, False, run)
    assert isinstance(ddp, DDP)
    idx = rows(data.batch_indices(0, B, rank, WORLD))
    _, loss = ddp(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert C.unwrap(ddp) is m
    torch.save({n: p.grad for n, p in m.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
    # each rank's RNG goes into rank 0's checkpoint and comes back to its own rank (through JSON, as meta does)
    torch.manual_seed(100 + rank)
    states = json.loads(json.dumps(C.all_rng_states()))
    draws = torch.rand(4)
    C.set_rng_state(states)
    assert len(states) == WORLD and torch.equal(torch.rand(4), draws)
    torch.save(draws, os.path.join(out_dir, f"draws{rank}.pt"))
    del ddp  # its reducer holds the process group; drop it before the group goes
    R.cleanup_distributed()  # what every recipe ends with: barrier, then teardown (a rank leaving early aborts the other)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_step_equals_one_process(tmp_path):
    import data
    ctx = mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            raise TimeoutError("DDP workers did not finish in 120 s")

    # one process, the same global batch (B * WORLD rows, the union of the ranks' shares)
    m = build_model()
    idx = rows(data.batch_indices(0, B * WORLD))
    _, loss = m(idx[:, :-1], idx[:, 1:])
    loss.backward()
    ref = {n: p.grad for n, p in m.named_parameters()}

    grads = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(WORLD)]
    assert grads[0].keys() == ref.keys()
    for name, g in ref.items():
        assert g is not None and g.abs().max() > 0, name
        for r in range(WORLD):
            assert (grads[r][name] - g).abs().max() < 1e-6, (r, name)
    draws = [torch.load(tmp_path / f"draws{r}.pt", weights_only=True) for r in range(WORLD)]
    assert not torch.equal(draws[0], draws[1])  # each rank got back its own stream, not rank 0's


def test_cleanup_distributed_warns_while_a_ddp_wrapper_lives(tmp_path, capfd):
    """A DDP wrapper alive at teardown keeps the gloo group alive past destroy_process_group (see
    model.cleanup_distributed): the cleanup names it; once the wrapper is dropped it is quiet."""
    import model as M
    import runtime as R
    import checkpoint as C
    from torch.nn.parallel import DistributedDataParallel as DDP
    for keep_wrapper in (True, False):
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{keep_wrapper}'}",
                                             rank=0, world_size=1)
        layer = nn.Linear(2, 2)
        wrapped = DDP(layer)
        if not keep_wrapper:
            wrapped = C.unwrap(wrapped)
        R.cleanup_distributed()
        assert (R.TEARDOWN_WARNING in capfd.readouterr().err) == keep_wrapper
        del wrapped
