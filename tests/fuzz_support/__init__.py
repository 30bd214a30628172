"""Coverage-guided fuzz targets (atheris/libFuzzer) for every parser that reads another party's bytes.

    scripts/fuzz.sh TARGET SECONDS        one campaign (TARGET or `all`), corpus in tests/fuzz/corpus/TARGET
    tests/test_fuzz.py                    the corpus replayed, a short campaign of each target, mutants caught

Each target is a module with `one_input(data: bytes) -> None` that turns the fuzzer's bytes into an
input for the code under test and checks *properties*, not only that nothing crashed: which exceptions
may come out (only the documented one), decisions equal to an independent oracle written from the
protocol's text, round trips, and that how a stream is cut into reads changes nothing. A violated
property raises AssertionError; any other exception is the code under test failing. Either is a
finding: libFuzzer saves the input as crash-<sha1> and the run exits non-zero.

TARGETS maps a target's name to its module and to the packages atheris instruments for coverage.
"""

from __future__ import annotations

from typing import NamedTuple


class Target(NamedTuple):
    module: str
    instrument: tuple[str, ...]
    what: str


TARGETS: dict[str, Target] = {
    "blkif": Target("fuzz_support.blkif_target", ("xenblk_vhost.blkif",),
                    "ring intake + decode + validate, 3 ABIs, indirect pages, responses"),
    "frontend_params": Target("fuzz_support.frontend_params_target", ("xenblk_vhost.backend.xenbus",
                                                                       "xenblk_vhost.blkif.abi"),
                              "the frontend's xenstore nodes -> ConnectionSpec"),
    "xs_wire": Target("fuzz_support.xs_wire_target", ("xenblk_vhost.xen.xs_wire",),
                      "xenstore wire codec: stream reader, message encoding, string lists"),
    "config": Target("fuzz_support.config_target", ("xenblk_vhost.config", "xenblk_vhost.vdev"),
                     "a domain's YAML file"),
    "control": Target("fuzz_support.control_target", ("xenblk_vhost.observability", "xenblk_vhost.vdev"),
                      "control socket request line: parse + the async answer with the real handlers"),
    "qmp": Target("fuzz_support.qmp_target", ("xenblk_vhost.device_model.qmp",),
                  "QMP byte stream of the device-model route, cut into reads"),
}
