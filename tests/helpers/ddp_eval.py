"""Run the MMEB protocol on 2 gloo processes (127.0.0.1); rank 0 writes what it got as JSON.

usage: python tests/helpers/ddp_eval.py ROOT OUT_JSON PORT
"""

import json
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from embedkit.eval import mmeb  # noqa: E402
from tests.helpers import mmeb_fixture as fx  # noqa: E402


def worker(rank: int, world: int, root: str, out: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        encoded = []

        def encode(items):
            encoded.append(len(items))
            return fx.scrambled_encoder(items)

        summary = mmeb.evaluate(root, [], encode)
        counts = [None] * world
        dist.all_gather_object(counts, sum(encoded))
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"summary": summary, "encoded_per_rank": counts}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    root, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mp.spawn(worker, args=(2, root, out, port), nprocs=2, join=True)
