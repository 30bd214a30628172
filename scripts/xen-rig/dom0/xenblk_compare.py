#!/usr/bin/env python3
"""Side by side: what a guest negotiated with our backend and with kernel blkback.

    xenblk_compare.py OURS.json OUR_GUEST REF.json REF_GUEST KEY...

Prints every neg.* value of both guests; exits 1 if any KEY (a `negotiated`
key, e.g. persistent_grants) differs or is missing on either side.
System python3, standard library only.
"""
import json
import sys


def main() -> int:
    ours_path, ours_name, ref_path, ref_name, *keys = sys.argv[1:]
    ours = json.load(open(ours_path))[ours_name]["negotiated"]
    ref = json.load(open(ref_path))[ref_name]["negotiated"]
    bad = []
    print(f"{'negotiated':32} {'xenblk-vhost ' + ours_name:34} {'blkback ' + ref_name}")
    for k in sorted(set(ours) | set(ref)):
        a, b = ours.get(k), ref.get(k)
        mark = " "
        if k in keys:
            mark = "=" if a == b and a is not None else "X"
            if mark == "X":
                bad.append(k)
        print(f"{mark} {k:30} {str(a):34} {b}")
    for k in keys:
        if k not in ours and k not in ref:
            bad.append(k)
            print(f"X {k}: reported by neither guest")
    if bad:
        print(f"DIFFERENT from kernel blkback: {', '.join(bad)}")
        return 1
    print(f"same as kernel blkback: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
