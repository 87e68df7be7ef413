"""Checkpoint save / restore time and throughput across meshes, beside a plain file write/read.

A model of `LAYERS` Column -> Row parallel pairs (`D -> F -> D`, shardlax.nn
on the fsdp layouts, flax nnx.Linear on dp / zero2) with AdamW state: the
checkpoint holds the parameters and two moments, about 3x the parameter
bytes (~400 MB by default). Every float leaf is random (so nothing compresses
away). For each layout the script saves (`shardlax.checkpoint.save`: the time
until it returns, the *blocking* part, and until `wait()`, the *total*) and
restores into the same layout and into the others (`checkpoint.restore`, until
every array is ready): a checkpoint saved by zero2 on 8 devices restores on
one device or under fsdp with no conversion step.

The ceiling is measured in the same run on the same disk: one sequential
write of the same number of bytes from one host buffer (`write` + `fsync`),
and one sequential read of it back (`readinto`). Reads of both come from the
page cache when it holds them (the script cannot drop it), so compare save
with write and restore with read, not with the disk's datasheet.

    throughput = checkpoint bytes / time      fraction = throughput / ceiling

Run:
    python benchmarks/checkpoint.py             # ~400 MB, 3 repeats, results outside the repo
    python benchmarks/checkpoint.py --publish   # into benchmarks/results/checkpoint.*
    python benchmarks/checkpoint.py --quick     # smoke run (small model, 1 repeat)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as C

# ----------------------------------------------------------------------------- config
DEVICES = 8
LAYERS, D, F = 4, 1024, 4096  # 4 x (2 x 4M) params = 134 MB f32; with AdamW ~403 MB
QUICK = (1, 128, 512)
REPEATS = 3
#: name -> (strategy, (data, fsdp, model), shardlax.nn layers?)
LAYOUTS = {
    "dp/1": ("dp", (1, 1, 1), False),
    "zero2/8": ("zero2", (8, 1, 1), False),
    "fsdp/8": ("fsdp", (1, 8, 1), True),
    "fsdp+tp/(1,4,2)": ("fsdp+tp", (1, 4, 2), True),
}
# -----------------------------------------------------------------------------


def build(layout: str, layers: int, d: int, f: int):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import shardlax

    strategy, shape, sharded = LAYOUTS[layout]
    mesh = shardlax.make_mesh(*shape)

    class Stack(nnx.Module):
        def __init__(self, rngs):
            def pair():
                if sharded:
                    return (shardlax.nn.ColumnParallelLinear(d, f, mesh=mesh, rngs=rngs),
                            shardlax.nn.RowParallelLinear(f, d, mesh=mesh, rngs=rngs))  # fmt: skip
                return nnx.Linear(d, f, rngs=rngs), nnx.Linear(f, d, rngs=rngs)

            self.blocks = nnx.List([nnx.List(pair()) for _ in range(layers)])

        def __call__(self, x):
            for up, down in self.blocks:
                x = x + down(jnp.tanh(up(x)))
            return x

    def loss_fn(model, batch):
        return jnp.mean(model(batch) ** 2)

    model = Stack(nnx.Rngs(0))
    return shardlax.Trainer(model, optax.adamw(1e-3), loss_fn, mesh=mesh, strategy=strategy)


def random_state(trainer, seed: int):
    """A TrainState of random values, built through the logical layout (no step runs)."""
    import jax
    import numpy as np

    from shardlax import checkpoint

    rng = np.random.default_rng(seed)
    abstract, specs = checkpoint.abstract_logical(trainer), checkpoint.logical_specs(trainer)

    def make(a, spec):
        host = (rng.standard_normal(a.shape, np.float32).astype(a.dtype)
                if np.dtype(a.dtype).kind == "f" else np.ones(a.shape, a.dtype))  # fmt: skip
        sharding = jax.sharding.NamedSharding(trainer.mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: host[idx])

    def tree(item):
        return jax.tree.map(make, getattr(abstract, item), getattr(specs, item),
                            is_leaf=lambda x: isinstance(x, jax.P))  # fmt: skip

    logical = checkpoint.Logical(tree("params"), tree("opt_state"), trainer.init().rest, 1)
    return checkpoint.from_logical(trainer, logical)


def nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def ceiling(scratch: Path, size: int, repeats: int) -> dict:
    """Sequential write (+ fsync) and read of `size` bytes in `scratch`: seconds, medians."""
    import numpy as np

    buf = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    writes, reads = [], []
    for _ in range(repeats):
        path = scratch / "ceiling.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as fh:
            fh.write(memoryview(buf))
            fh.flush()
            os.fsync(fh.fileno())
        writes.append(time.perf_counter() - t0)
        out = np.empty_like(buf)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            fh.readinto(memoryview(out))
        reads.append(time.perf_counter() - t0)
        assert np.array_equal(out[:4096], buf[:4096])
        path.unlink()
    return {"write_s": statistics.median(writes), "read_s": statistics.median(reads)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where checkpoints are written (default: a temp dir)")  # fmt: skip
    C.add_output_args(parser)
    args = parser.parse_args(argv)
    out_dir = C.output_dir(args)
    layers, d, f = QUICK if args.quick else (LAYERS, D, F)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    C.setup_devices(DEVICES)
    import jax

    from shardlax import checkpoint

    info = C.machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="shardlax-ckpt-", dir=args.scratch))
    rows = []
    try:
        with jax.numpy_dtype_promotion("standard"):
            trainers = {}
            for name in LAYOUTS:
                C.phase(f"build {name}: {layers} x ({d} -> {f} -> {d}) with AdamW")
                trainers[name] = build(name, layers, d, f)
            states = {}
            for name, trainer in trainers.items():
                states[name] = random_state(trainer, 0)
            size = nbytes(checkpoint.to_logical(trainers["dp/1"], states["dp/1"]))
            C.phase(f"ceiling: sequential write/read of {C.fmt_bytes(size)} in {scratch}")
            ceil = ceiling(scratch, size, repeats)
            ceil_w, ceil_r = size / ceil["write_s"] / 1e9, size / ceil["read_s"] / 1e9
            C.phase(f"ceiling: write {ceil_w:.3g} GB/s, read {ceil_r:.3g} GB/s")
            for name, trainer in trainers.items():  # compile the converters, warm orbax
                C.phase(f"warm-up save + restore {name}")
                warm = scratch / f"warmup_{name.replace('/', '_')}"
                checkpoint.save(trainer, warm, states[name], step=1)
                jax.block_until_ready(checkpoint.restore(trainer, warm))
                shutil.rmtree(warm)
            for src, trainer in trainers.items():
                blocking, total, dirs = [], [], []
                for r in range(repeats):
                    directory = scratch / f"{src.replace('/', '_')}_{r}"
                    t0 = time.perf_counter()
                    checkpoint.save(trainer, directory, states[src], step=1)
                    t1 = time.perf_counter()
                    checkpoint.wait()
                    t2 = time.perf_counter()
                    blocking.append(t1 - t0)
                    total.append(t2 - t0)
                    dirs.append(directory)
                on_disk = sum(p.stat().st_size for p in dirs[0].rglob("*") if p.is_file())
                save_s = statistics.median(total)
                C.phase(f"save {src}: {C.fmt_time(save_s)} ({size / save_s / 1e9:.3g} GB/s), "
                        f"blocking {C.fmt_time(statistics.median(blocking))}")  # fmt: skip
                for dst, target in trainers.items():
                    times = []
                    for r in range(repeats):
                        t0 = time.perf_counter()
                        restored = checkpoint.restore(target, dirs[r])
                        jax.block_until_ready(restored)
                        times.append(time.perf_counter() - t0)
                        del restored
                    restore_s = statistics.median(times)
                    C.phase(f"restore {src} -> {dst}: {C.fmt_time(restore_s)} "
                            f"({size / restore_s / 1e9:.3g} GB/s)")  # fmt: skip
                    rows.append({
                        "saved_on": src, "restored_on": dst, "bytes": size,
                        "bytes_on_disk": on_disk, "repeats": repeats,
                        "save_blocking_s": statistics.median(blocking), "save_s": save_s,
                        "restore_s": restore_s,
                        "save_GBps": size / save_s / 1e9,
                        "restore_GBps": size / restore_s / 1e9,
                        "ceiling_write_GBps": ceil_w, "ceiling_read_GBps": ceil_r,
                        "save_fraction": ceil["write_s"] / save_s,
                        "restore_fraction": ceil["read_s"] / restore_s,
                        "model": {"layers": layers, "d": d, "f": f}, "machine": info,
                    })  # fmt: skip
                for directory in dirs:
                    shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    C.write_jsonl(out_dir / "checkpoint.jsonl", rows)
    (out_dir / "checkpoint.md").write_text(markdown(rows, info))
    C.phase(f"wrote {out_dir / 'checkpoint.jsonl'} and {out_dir / 'checkpoint.md'}")


def markdown(rows, info) -> str:
    if not rows:
        return "# Checkpoint save / restore\n\nNo rows.\n"
    r0 = rows[0]
    body = C.md_table(
        ["saved on", "restored on", "save", "save GB/s", "of write", "blocking", "restore",
         "restore GB/s", "of read"],
        [[r["saved_on"], r["restored_on"], C.fmt_time(r["save_s"]), f"{r['save_GBps']:.3g}",
          f"{r['save_fraction']:.0%}", C.fmt_time(r["save_blocking_s"]),
          C.fmt_time(r["restore_s"]), f"{r['restore_GBps']:.3g}", f"{r['restore_fraction']:.0%}"]
         for r in rows],
        align="llrrrrrrr",
    )  # fmt: skip
    m = r0["model"]
    return (
        f"# Checkpoint save / restore (shardlax.checkpoint, orbax)\n\n"
        f"{C.machine_line(info)}.\n\n"
        f"Model: {m['layers']} x ({m['d']} -> {m['f']} -> {m['d']}) linears with AdamW: "
        f"{C.fmt_bytes(r0['bytes'])} of arrays in the logical layout "
        f"({C.fmt_bytes(r0['bytes_on_disk'])} on disk), medians of {r0['repeats']}. Ceiling "
        f"in the same run on the same disk: sequential write + fsync "
        f"{r0['ceiling_write_GBps']:.3g} GB/s, read {r0['ceiling_read_GBps']:.3g} GB/s "
        f"(page cache not dropped). *save* runs until the async write is done, *blocking* "
        f"until `save` returns (training may go on from there).\n\n"
        f"{body}\n\n{C.SIMULATED_NOTE}\n"
    )


if __name__ == "__main__":
    main()
