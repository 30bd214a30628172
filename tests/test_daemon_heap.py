"""daemon/heap.py: the collector kept out of a hand-over's pause (run in a child: gc.freeze is for good)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from xenblk_vhost.daemon.heap import freeze_startup_heap, no_collection

class Cycle:
    def __init__(self):
        self.me = self

alive = [Cycle() for _ in range(100)]
garbage = [Cycle() for _ in range(100)]
del garbage
frozen_before = gc.get_freeze_count()
freeze_startup_heap()
frozen = gc.get_freeze_count()
collected_after = gc.collect()   # the start-up's objects are no longer walked, nor its garbage left
with no_collection():
    inside = gc.isenabled()
    for _ in range(20000):       # far past the threshold: no automatic collection may run
        Cycle()
    pending = gc.get_count()[0]
after = gc.isenabled()
gc.disable()
with no_collection():
    pass
stays_disabled = not gc.isenabled()
print(json.dumps([frozen_before, frozen, collected_after, inside, pending, after, stays_disabled]))
"""


def test_the_startup_heap_is_frozen_and_no_collection_runs_in_the_pause():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    frozen_before, frozen, collected_after, inside, pending, after, stays_disabled = json.loads(out)
    assert frozen_before == 0 and frozen >= 200  # the 100 live cycles (and everything imported) frozen
    assert collected_after == 0                  # the 100 dead cycles were collected before the freeze
    assert inside is False and pending >= 20000  # 20000 new cycles, and no collection counted them down
    assert after is True                         # enabled again after
    assert stays_disabled                        # a collector disabled before stays disabled
