"""``embedkit mine`` then ``embedkit encode`` in one launch of several processes, as torchrun starts them.

usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/scripts/ranks_mine_encode.py \
           MINE_ARG ... -- ENCODE_ARG ...

The process group is joined here, once, so both verbs run in it (a verb leaves only a group it joined).
"""

import sys

from embedkit.cli import main as cli
from embedkit.distributed.ranks import join_launched_group, leave_group

if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--")
    assert join_launched_group()
    assert cli(["mine", *args[:cut]]) == 0
    assert cli(["encode", *args[cut + 1:]]) == 0
    leave_group()
