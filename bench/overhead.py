"""What the service costs beyond the work itself (issue 19), measured side by
side in one run, every service in its own process as deployed:

ingest
  - CPU-seconds per 1,000 tiles summed over every process of the stack
    (the four services, the tiler's reader processes, redis-server) during
    IngestSlide, against a plain sequential loop in one process (OpenSlide
    read_region, resize, ONNX Runtime batch 32) over the same tiles;
  - ingest tiles/s against the embedder alone (Embed RPCs of the same
    tiles, already in memory, batch 32, one client).
query, at --tiles synthetic vectors added straight to the index (+ the slide)
  - uncached image query p50 through the gateway against decode + embed +
    search in one process (the same FAISS factory and nprobe, the same
    number of candidates re-ranked exactly from vectors in RAM);
  - cached query p50 against that bare search alone;
  - the parts alone, for the breakdown: Embed RPC, index Search RPC, Redis GET.

    .venv/bin/python bench/overhead.py [--keep DIR] [--rounds 2] [--tiles 100000] [--queries 40] [--part ingest,query]
        [--ingests N] [--skip-loop] [--keep-index DIR]

Services take their other settings from SMILY_* variables (bench/gpu.sh sets readers and workers).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tiler as tiler_bench  # noqa: E402  (bench/tiler.py: the big synthetic slide writer)

from smily.client import Client  # noqa: E402
from smily.common import images  # noqa: E402
from smily.common.channels import channel  # noqa: E402
from smily.common.tensors import to_tensor  # noqa: E402
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402
from smily.gateway.v1 import gateway_pb2  # noqa: E402
from smily.index.v1 import index_pb2, index_pb2_grpc  # noqa: E402
from smily.localstack import free_port, start_redis  # noqa: E402
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc  # noqa: E402
from smily.types.v1 import types_pb2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SLIDE = "ingest-16k.tiff"
SIDE, SLIDE_MPP, TILE_MPP, TILE = 16_000, 0.5, 1.0, 224
PER_SLIDE = 5000


def write_slide(path: str) -> None:
    """16,000 x 16,000 px at 0.5 um/px, the issue's slide size; bench/tiler.py's writer."""
    tiler_bench.WIDTH, tiler_bench.HEIGHT, tiler_bench.MPP = SIDE, SIDE, SLIDE_MPP
    tiler_bench.write_big_slide(path)


class Stack:
    """redis-server and the four services, each `python -m smily.<svc>` in its own process."""

    def __init__(self, slides: str, index_dir: str, ivf_threshold: int):
        self.redis, url = start_redis()  # without redis-server (a GPU machine) the gateway caches in-process
        ports = {s: free_port() for s in ("tiler", "embedder", "index", "gateway")}
        env = dict(
            os.environ,
            SMILY_SLIDE_ROOTS=slides,
            SMILY_MODEL_REPOSITORY=MODELS,
            SMILY_INDEX_DIR=index_dir,
            SMILY_REDIS_URL=url,
            SMILY_LOG_LEVEL="WARNING",
            SMILY_METRICS_PORT="0",
            SMILY_INDEX_IVF_THRESHOLD=str(ivf_threshold),
            SMILY_BIND_HOST="127.0.0.1",
            SMILY_PLAINTEXT="1",
            SMILY_AUTH="none",  # loopback only, as the local stack
            SMILY_AUDIT_LOG=os.path.join(index_dir, "audit.jsonl"),
        )
        for s, p in ports.items():
            env[f"SMILY_{s.upper()}_PORT"] = str(p)
            env[f"SMILY_{s.upper()}_TARGET"] = f"127.0.0.1:{p}"
        self.targets = {s: f"127.0.0.1:{p}" for s, p in ports.items()}
        self.procs = {}
        for s in ("tiler", "embedder", "index", "gateway"):
            self.procs[s] = subprocess.Popen([sys.executable, "-m", f"smily.{s}"], env=env, cwd=ROOT)
        self.redis_url = url
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        for s, t in self.targets.items():
            stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(t))
            deadline = time.monotonic() + 900  # an index trains a kept 100k-tile folder again on busy cores
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.procs[s].poll() is not None:
                    self.stop()  # leave no service behind
                    raise RuntimeError(f"{s} did not start")
                time.sleep(0.2)

    def processes(self) -> list[tuple[str, psutil.Process]]:
        out = []
        named = [*self.procs.items(), *([("redis", self.redis)] if self.redis else [])]
        for name, p in named:
            proc = psutil.Process(p.pid)
            out += [(name, proc), *((f"{name} children", c) for c in proc.children(recursive=True))]
        return out

    def cpu(self) -> dict[tuple[str, int], float]:
        times = {}
        for name, p in self.processes():
            try:
                t = p.cpu_times()
                times[(name, p.pid)] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return times

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(30)
        if self.redis:
            self.redis.terminate()
            self.redis.wait()


def cpu_delta(before: dict, after: dict) -> float:
    return sum(t - before.get(key, 0.0) for key, t in after.items())


def cpu_by_process(before: dict, after: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, pid), t in after.items():
        out[name] = out.get(name, 0.0) + t - before.get((name, pid), 0.0)
    return out


def plain_loop(slide_path: str, rects, model) -> tuple[float, float]:
    """OpenSlide read_region, resize, ONNX Runtime batch 32, one thread of Python: (wall s, CPU s)."""
    import openslide

    from smily.embedder.preprocess import resize

    slide = openslide.OpenSlide(slide_path)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    batch = []
    for x, y, size in rects:
        level = slide.get_best_level_for_downsample(size / TILE + 1e-6)
        ds = slide.level_downsamples[level]
        side = round(size / ds)
        region = slide.read_region((x, y), level, (side, side)).convert("RGB")
        batch.append(resize(np.asarray(region), TILE))
        if len(batch) == 32:
            model.embed_tensor(model.preprocess(batch))
            batch = []
    if batch:
        model.embed_tensor(model.preprocess(batch))
    result = time.perf_counter() - start_wall, time.process_time() - start_cpu
    slide.close()
    return result


def ingest_part(args, stack: Stack, slide_path: str) -> dict:
    from smily.embedder.model_repo import load
    from smily.embedder.runtime import Model

    tiler = tiler_pb2_grpc.TilerServiceStub(channel(stack.targets["tiler"]))
    tiles = [
        t
        for m in tiler.StreamTiles(
            tiler_pb2.StreamTilesRequest(
                slide=SLIDE,
                params=tiler_pb2.TilingParams(mpp=TILE_MPP, tile_size=TILE),
                encoding=types_pb2.IMAGE_ENCODING_RAW_RGB,
            ),
            timeout=600,
        )
        for t in m.tiles
    ]
    n = len(tiles)
    rects = [(t.x, t.y, t.width) for t in tiles]
    print(f"slide: {SIDE} x {SIDE} px at {SLIDE_MPP} um/px, {n} tissue tiles of {TILE} px at {TILE_MPP} um/px")
    config, path = load(MODELS, "efficientnet-lite0/1")
    model = Model(config, path)
    embedder = embedder_pb2_grpc.EmbedderServiceStub(channel(stack.targets["embedder"]))
    client = Client(stack.targets["gateway"], timeout=600)
    # The bare session: batch-32 tensors made beforehand, session runs alone.
    tensors = [
        model.preprocess([images.decode(t.image.data, t.image.encoding, TILE, TILE) for t in tiles[i : i + 32]])
        for i in range(0, n, 32)
    ]
    streams = args.ingests  # concurrent ingests (and embedder clients): one per slide copy
    total = n * streams
    rows = {"loop": [], "bare": [], "embedder": [], "service": []}
    for r in range(args.rounds):
        if not args.skip_loop:
            wall, cpu = plain_loop(slide_path, rects, model)
            rows["loop"].append((wall, cpu))

        t0, c0 = time.perf_counter(), time.process_time()
        for t in tensors:
            model.embed_tensor(t)
        rows["bare"].append((time.perf_counter() - t0, time.process_time() - c0))

        def embed_all(_):
            for i in range(0, n, 32):
                embedder.Embed(embedder_pb2.EmbedRequest(images=[t.image for t in tiles[i : i + 32]]), timeout=600)

        before, c0, t0 = stack.cpu(), time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(embed_all, range(streams)))
        wall = time.perf_counter() - t0
        rows["embedder"].append((wall, cpu_delta(before, stack.cpu()) + time.process_time() - c0))

        before, c0, t0 = stack.cpu(), time.process_time(), time.perf_counter()
        ops = [client.ingest(SLIDE, f"ingest-bench-{i}") for i in range(streams)]
        ops = [client.wait(op, poll_s=0.1) for op in ops]
        wall = time.perf_counter() - t0
        for op in ops:
            assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
            assert op.progress.tiles_indexed == n, (op.progress.tiles_indexed, n)
        after = stack.cpu()
        stack_cpu = cpu_delta(before, after)
        rows["service"].append((wall, stack_cpu, time.process_time() - c0))
        parts = cpu_by_process(before, after)
        print(
            "  stack CPU-s per 1,000 tiles by process: "
            + ", ".join(f"{name} {t / total * 1000:.2f}" for name, t in sorted(parts.items(), key=lambda kv: -kv[1]))
        )
        loop = f"loop {n / rows['loop'][-1][0]:.0f} tiles/s ({rows['loop'][-1][1]:.2f} CPU-s); " if rows["loop"] else ""
        print(
            f"round {r + 1}: {loop}bare session {n / rows['bare'][-1][0]:.0f} tiles/s; "
            f"embedder alone {total / rows['embedder'][-1][0]:.0f} tiles/s; service {total / wall:.0f} tiles/s "
            f"({stack_cpu:.2f} CPU-s over the stack, client {rows['service'][-1][2]:.2f})",
            flush=True,
        )
    client.close()

    def med(key, i):
        return statistics.median(row[i] for row in rows[key])

    svc_cpu = med("service", 1) / total * 1000
    bare_tps, emb_tps, svc_tps = n / med("bare", 0), total / med("embedder", 0), total / med("service", 0)
    print()
    print(f"| ingest, {n} tiles x {streams} concurrent, median of {args.rounds} rounds | figure |")
    print("| --- | --- |")
    if rows["loop"]:
        loop_cpu, loop_tps = med("loop", 1) / n * 1000, n / med("loop", 0)
        print(
            f"| CPU-s per 1,000 tiles: stack (all processes) vs plain loop | {svc_cpu:.2f} vs {loop_cpu:.2f} "
            f"(**{svc_cpu / loop_cpu:.2f}x**) |"
        )
        print(f"| tiles/s: plain loop | {loop_tps:.0f} |")
    print(
        f"| tiles/s: service vs embedder alone (Embed RPCs, batch 32) | {svc_tps:.0f} vs {emb_tps:.0f} "
        f"(**{svc_tps / emb_tps:.2f}x**) |"
    )
    print(
        f"| tiles/s: service vs bare batch-32 session (tensors made beforehand, {model.provider}) | "
        f"{svc_tps:.0f} vs {bare_tps:.0f} (**{svc_tps / bare_tps:.2f}x**) |"
    )
    print(f"| CPU-s per 1,000 tiles: embedder alone (its process + client) | {med('embedder', 1) / total * 1000:.2f} |")
    return {"tiles": n}


def png_patch(stack: Stack):
    tiler = tiler_pb2_grpc.TilerServiceStub(channel(stack.targets["tiler"]))
    patch = np.asarray(
        Image.open(
            io.BytesIO(
                tiler.ReadRegion(
                    tiler_pb2.ReadRegionRequest(
                        slide=SLIDE,
                        x=SIDE // 2,
                        y=SIDE // 2,
                        width=448,
                        height=448,
                        mpp=1.0,
                        encoding=types_pb2.IMAGE_ENCODING_PNG,
                    )
                ).image.data
            )
        )
    )

    def png(i: int) -> bytes:
        img = patch.copy()
        img[0, 0] = (i % 256, i // 256 % 256, 7)  # one pixel: a new hash, the same tissue
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    return png


def synthetic(n: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, PER_SLIDE):
        m = min(PER_SLIDE, n - s)
        v = np.abs(rng.standard_normal((m, dim))).astype(np.float32)
        out[s : s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def interleaved_p50(cases: dict, queries: int) -> dict[str, float]:
    """p50 ms of each case, the cases taking turns query by query, so load
    from elsewhere on the machine falls on all of them alike."""
    lat: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(queries):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(i)
            lat[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1000 for name, v in lat.items()}


def fill_index(stack: Stack, tiles: int, ivf_threshold: int):
    """The slide ingested and `tiles` synthetic vectors added through AddTiles/CommitSlide (a kept
    index has them), the IVF index trained; returns (index stub, model id, vectors, GetIndexInfo)."""
    client = Client(stack.targets["gateway"], timeout=600)
    if not client.slides():
        client.wait(client.ingest(SLIDE, "ingest-bench-0"))
    client.close()
    index = index_pb2_grpc.IndexServiceStub(channel(stack.targets["index"]))
    model_id = index.GetIndexInfo(index_pb2.GetIndexInfoRequest()).model_id
    vectors = synthetic(tiles, 1280)
    t0 = time.perf_counter()
    have = index.GetIndexInfo(index_pb2.GetIndexInfoRequest()).tile_count
    for s in range(0, tiles if have < tiles else 0, PER_SLIDE):
        v = vectors[s : s + PER_SLIDE]
        slide_id = f"bench-{s // PER_SLIDE:03d}"
        rects = [
            index_pb2.TileRect(x=(i % 100) * 448, y=(i // 100) * 448, width=448, height=448, mpp=1.0)
            for i in range(len(v))
        ]
        index.AddTiles(
            index_pb2.AddTilesRequest(
                model_id=model_id, slide_id=slide_id, generation="g", embeddings=to_tensor(v), tiles=rects
            ),
            timeout=600,
        )
        index.CommitSlide(
            index_pb2.CommitSlideRequest(
                model_id=model_id,
                generation="g",
                expected_tiles=len(v),
                slide=index_pb2.Slide(slide_id=slide_id, source="none"),
            ),
            timeout=600,
        )
    while True:  # IVF trains in the background: measure the trained index
        info = index.GetIndexInfo(index_pb2.GetIndexInfoRequest())
        if info.index_type.startswith("IVF") or tiles < ivf_threshold:
            break
        time.sleep(1)
    print(
        f"\nindex: {info.tile_count} tiles ({info.index_type or 'Flat'}, nprobe {info.default_nprobe}), "
        f"built in {time.perf_counter() - t0:.0f} s"
    )
    return index, model_id, vectors, info


def query_part(args, stack: Stack) -> None:
    import faiss
    import redis

    from smily.embedder.model_repo import load
    from smily.embedder.runtime import Model

    index, model_id, vectors, info = fill_index(stack, args.tiles, args.ivf_threshold)
    client = Client(stack.targets["gateway"], timeout=600)

    # The bare side: the same factory and nprobe over the same vectors (+ nothing else), in this process.
    config, path = load(MODELS, "efficientnet-lite0/1")
    model = Model(config, path)
    k, rerank = 10, 100  # the service's SMILY_INDEX_RERANK default: k * 100 candidates
    if info.index_type.startswith("IVF"):
        bare = faiss.index_factory(1280, info.index_type, faiss.METRIC_INNER_PRODUCT)
        bare.train(vectors[:100_000])
        bare.add(vectors)
        faiss.extract_index_ivf(bare).nprobe = info.default_nprobe
        want = k * rerank
    else:
        bare, want = faiss.IndexFlatIP(1280), k
        bare.add(vectors)

    faiss.omp_set_num_threads(1)  # one query: one thread is faster, as in the service (index/ann.py)

    def bare_search(q: np.ndarray):
        _, ids = bare.search(q[None], want)
        ids = ids[0][ids[0] >= 0]
        if want > k:  # exact re-rank of the candidates, vectors in RAM
            scores = vectors[ids] @ q
            ids = ids[np.argsort(-scores)[:k]]
        return ids

    png = png_patch(stack)
    fixed = png(10**6)
    queries = args.queries
    seq = [0]

    def fresh(_):
        seq[0] += 1
        return png(seq[0])

    def bare_query(i):
        rgb = images.decode(fresh(i))
        q = model.embed_tensor(model.preprocess([rgb]))[0]
        return bare_search(q)

    pngs = [fresh(i) for i in range(queries)]  # encoded beforehand: not part of either side
    more = [fresh(i) for i in range(queries)]  # the same images' twins for the one-process side
    q_vec = model.embed_tensor(model.preprocess([images.decode(fixed)]))[0]
    client.search(image=fixed, k=k)  # warm: channels, model id, cache entry
    embedder = embedder_pb2_grpc.EmbedderServiceStub(channel(stack.targets["embedder"]))
    query = to_tensor(q_vec)
    r = redis.Redis.from_url(stack.redis_url) if stack.redis_url else None
    if r is not None:
        r.set("bench", q_vec.tobytes())
    extra = [fresh(i) for i in range(queries)]
    cases = {
        "gateway, uncached": lambda i: client.search(image=pngs[i], k=k),
        "one process: decode + embed + search": lambda i: bare_search(
            model.embed_tensor(model.preprocess([images.decode(more[i])]))[0]
        ),
        "gateway, cached": lambda i: client.search(image=fixed, k=k),
        "one process: search alone": lambda i: bare_search(q_vec),
        "one process: decode + preprocess": lambda i: model.preprocess([images.decode(more[i])]),
        "one process: inference, batch 1": lambda i: model.embed_tensor(model.preprocess([images.decode(fixed)])),
        "Embed RPC of the PNG (embedder process)": lambda i: embedder.Embed(
            embedder_pb2.EmbedRequest(images=[types_pb2.Image(data=extra[i])])
        ),
        "index Search RPC, k=10 (index process)": lambda i: index.Search(
            index_pb2.SearchRequest(model_id=model_id, query=query, k=k)
        ),
    }
    if r is not None:
        cases["Redis GET of an embedding"] = lambda i: r.get("bench")
    rows = interleaved_p50(cases, queries)
    client.close()
    unc, cached = rows["gateway, uncached"], rows["gateway, cached"]
    one, search = rows["one process: decode + embed + search"], rows["one process: search alone"]
    print(f"\n| query, p50 of {queries} (one client, the cases taking turns) | ms |")
    print("| --- | ---: |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} |")
    print(
        f"\nuncached through the gateway vs one process: **{unc / one:.2f}x**; "
        f"cached vs the bare search: **{cached / search:.2f}x**"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="folder to keep the slide in between runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--ivf-threshold", type=int, default=50_000)
    ap.add_argument("--part", default="ingest,query")
    ap.add_argument("--ingests", type=int, default=1, help="concurrent ingests (and embedder clients)")
    ap.add_argument("--skip-loop", action="store_true", help="leave out the plain loop (GPU runs)")
    ap.add_argument("--keep-index", help="index folder kept between runs (its synthetic tiles are not added again)")
    args = ap.parse_args()
    slides = args.keep or tempfile.mkdtemp(prefix="smily-overhead-")
    os.makedirs(slides, exist_ok=True)
    slide_path = os.path.join(slides, SLIDE)
    if not os.path.exists(slide_path):
        t0 = time.perf_counter()
        write_slide(slide_path)
        print(f"slide written in {time.perf_counter() - t0:.0f} s")
    index_dir = args.keep_index or tempfile.mkdtemp(prefix="smily-overhead-index-")
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)")
    stack = Stack(slides, index_dir, args.ivf_threshold)
    try:
        if "ingest" in args.part:
            ingest_part(args, stack, slide_path)
        if "query" in args.part:
            query_part(args, stack)
    finally:
        stack.stop()
        if not args.keep_index:
            shutil.rmtree(index_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(slides, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
