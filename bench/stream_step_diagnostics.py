"""Why a streamed CICW step runs slower than an in-memory one (bench/stream_train.py (1)).

Trains the same model over the same records, 234 steps of 128, in three feeds interleaved over
--repeats rounds, and prints each feed's ms per step and its ratio to "memory":
  memory    slices of one resident tensor (stream_train.py's in-memory feed);
  replayed  the batches a KafkaSource cut and decode_batch made, collected first and then
            trained on with nothing else running: the stream's batch composition and
            freshly allocated tensors, without its concurrency;
  threaded  memory slices while a Python thread in this process wakes every 2 ms for a small
            numpy job (GIL hand-overs as a poller or decode thread causes them).
A replayed ratio near 1 means the streaming cost is not the data; a threaded ratio near 1 means
light background Python work alone does not slow the step.

    python bench/stream_step_diagnostics.py [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import numpy as np
import stream_train as st  # bench/ is on sys.path when a bench script runs
import torch

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.codecs import decode_batch
from workers.kafka.source import KafkaSource, SourceSpec

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def collect_stream(bootstrap: str, workload: st.Workload, n: int, batch: int) -> Batches:
    topic = st.fill_topic(bootstrap, workload, "diag")
    spec = SourceSpec(bootstrap_servers=bootstrap, topic=topic, stop_at="end", batch_size=batch, max_wait_s=0.05)
    out: Batches = []
    with KafkaSource(spec, group_id=f"diag-{uuid.uuid4().hex[:6]}") as source:
        while sum(len(b[1]) for b in out) < n:
            records = source.next_batch()
            if records is None:
                raise RuntimeError("source ended early")
            if records:
                decoded = decode_batch(records, workload.codec)
                out.append((decoded.inputs, decoded.targets))
    return out


def ms_per_step(workload: st.Workload, feed: Batches) -> float:
    trainer = st.make_trainer("mlp", workload.codec, torch.device("cpu"))
    t0 = time.perf_counter()
    for x, y in feed:
        trainer.step(x, y)
    return (time.perf_counter() - t0) / len(feed) * 1e3


def with_background_thread(fn):  # type: ignore[no-untyped-def]
    stop = threading.Event()

    def wake_often() -> None:
        a = np.random.default_rng(0).random((128, 784))
        while not stop.is_set():
            time.sleep(0.002)
            (a * 2.0).astype(np.float32)

    thread = threading.Thread(target=wake_often, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        stop.set()
        thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    batch, n = 128, 234 * 128
    workload = st.load_workload("mlp", n + 2 * batch, "auto")
    x, y = st.decoded_in_memory(workload)
    memory = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    with EmbeddedBroker() as broker:
        replayed = collect_stream(broker.bootstrap, workload, n, batch)
    print(f"{st.machine(torch.device('cpu'))}; {workload.source}; {len(memory)} / {len(replayed)} steps of "
          f"{batch}; 1 torch thread; {args.repeats} interleaved rounds")
    ms_per_step(workload, memory)  # warm-up
    results: dict[str, list[float]] = {"memory": [], "replayed": [], "threaded": []}
    for _ in range(args.repeats):
        results["memory"].append(ms_per_step(workload, memory))
        results["replayed"].append(ms_per_step(workload, replayed))
        results["threaded"].append(with_background_thread(lambda: ms_per_step(workload, memory)))
    base = statistics.median(results["memory"])
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:>9} ms/step {med:6.2f}  (runs {' '.join(f'{v:.2f}' for v in values)})  "
              f"speed vs memory {base / med:.3f}")


if __name__ == "__main__":
    main()
