#!/usr/bin/env python3
"""The small-file tree of scripts/fsbench: real source files, the same bytes every run.

    fsbench-tree.py MIRROR CACHEDIR KIND OWNER/NAME@TAG...

Each OWNER/NAME@TAG is `git archive`d from the bare repository MIRROR/OWNER/NAME.git at
that tag (its commit is resolved first), under tree/OWNER-NAME-TAG/, into one tar in
CACHEDIR named after KIND and a hash of the commits; an existing tar is reused. Owners
and groups are normalised (root), timestamps are the commits' own, so the tar depends
only on the commits. A package missing from the mirror is left out with a warning (the
hash, and so the file name, then differ). With no package at all (no mirror on this
machine) a synthetic tree is made instead from a fixed seed: 15,000 files (1,500 for
KIND quick), sizes mostly small with a long tail. Prints the tar's path.
"""
import hashlib
import io
import os
import random
import subprocess
import sys
import tarfile


def warn(message):
    print(f"fsbench-tree: {message}", file=sys.stderr)


def resolve(mirror, specs):
    found = []
    for spec in specs:
        repo, _, tag = spec.rpartition("@")
        path = os.path.join(mirror, repo + ".git")
        if not os.path.isdir(path):
            warn(f"{repo} is not in {mirror}: left out")
            continue
        r = subprocess.run(["git", "-C", path, "rev-parse", "-q", "--verify", tag + "^{commit}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            warn(f"{repo} has no tag {tag}: left out")
            continue
        found.append((repo, tag, r.stdout.strip(), path))
    return found


def normalised(member):
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def from_mirror(out, packages):
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as dst:
        top = tarfile.TarInfo("tree")
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, 0
        dst.addfile(normalised(top))
        for repo, tag, commit, path in packages:
            prefix = f"tree/{repo.replace('/', '-')}-{tag}/"
            p = subprocess.Popen(["git", "-C", path, "archive", "--format=tar", f"--prefix={prefix}", commit],
                                 stdout=subprocess.PIPE)
            with tarfile.open(fileobj=p.stdout, mode="r|") as src:
                for m in src:
                    data = src.extractfile(m) if m.isfile() else None
                    dst.addfile(normalised(m), data)
            if p.wait() != 0:
                raise SystemExit(f"fsbench-tree: git archive of {repo}@{tag} failed")


def synthetic(out, files):
    rng = random.Random(42)
    dirs = max(1, files // 5)
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in range(dirs):
            info = tarfile.TarInfo(f"tree/d{d // 100}/sub{d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(normalised(info))
        for i in range(files):
            size = min(int(rng.lognormvariate(8.0, 1.6)), 4 << 20)
            info = tarfile.TarInfo(f"tree/d{(i % dirs) // 100}/sub{i % dirs}/file-{i}-{'x' * (i % 40)}.dat")
            info.size, info.mode = size, 0o644
            tar.addfile(normalised(info), io.BytesIO(rng.randbytes(size)))


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    mirror, cache, kind, specs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    packages = resolve(mirror, specs)
    if packages:
        key = hashlib.sha256("\n".join(f"{r}@{c}" for r, _, c, _ in packages).encode()).hexdigest()[:16]
    else:
        warn(f"no package of the list is in {mirror}: using a synthetic tree")
        key = "synthetic-v1"
    out = os.path.join(cache, f"fsbench-tree-{kind}-{key}.tar")
    if not os.path.exists(out):
        tmp = f"{out}.tmp.{os.getpid()}"
        try:
            if packages:
                from_mirror(tmp, packages)
            else:
                synthetic(tmp, 1500 if kind == "quick" else 15000)
            os.rename(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    print(out)


if __name__ == "__main__":
    main()
