r"""Ingest throughput vs plain PyAV decode + resize of the same files and frames.

Side by side in one run, on the sample clips (data/samples, or --manifest):

- **ingest**: the real ingest stage (`regdpo.stages.run(cfg, "ingest")` into a fresh workdir):
  manifest parsing, content hashing, probing, timestamp-exact frame picking, rotation, resize
  + centre crop, writing the normalised clip mp4s, the journaled publish;
- **pyav**: a plain loop that opens each file, decodes from its start through the clip window,
  keeps the frame shown at each target time and resizes it with `frame.reformat`: the floor
  any ingest pays (it writes nothing, and does no hashing, rotation, cropping or bookkeeping).

Both make the same frames of the same files (cfg.video: clips x frames per clip). The variants
alternate, --repeats times each, and the medians are compared as output frames per second, on
wall time (the key) and on process CPU time (steadier when other work shares the machine).

    .venv/bin/python benchmarks/ingest.py [--size 64 --frames 9 --fps 8 --repeats 5 --manifest PATH]

Last line: one JSON object with `ingest_over_pyav` (goal >= 0.8) and every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regdpo.config import config_from_dict  # noqa: E402
from regdpo.data.manifest import read_manifest  # noqa: E402
from regdpo.stages import run  # noqa: E402


def pyav_decode_resize(files: list[Path], *, fps: float, num_frames: int, height: int, width: int) -> int:
    """The same frames ingest makes, the plain way: decode each file from its start until the clip
    window ends, keep the last frame at or before each target time k/fps, resize it. Returns the
    number of frames made (clips x num_frames)."""
    made = 0
    targets = [k / fps for k in range(num_frames)]
    for path in files:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            picks: list = [None] * num_frames
            for frame in container.decode(stream):
                t = (frame.time or 0.0) - origin
                for k, target in enumerate(targets):
                    if t <= target + 1e-6:
                        picks[k] = frame
                if t > targets[-1]:
                    break
            for frame in picks:
                frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
                made += 1
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=ROOT / "data" / "samples" / "manifest.csv")
    ap.add_argument("--size", type=int, default=64, help="output height and width (multiple of 16)")
    ap.add_argument("--frames", type=int, default=9, help="frames per clip (4k+1)")
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    rows = read_manifest(args.manifest)
    files = [args.manifest.parent / r.path for r in rows]
    video = {"fps": args.fps, "num_frames": args.frames, "height": args.size, "width": args.size}
    tmp = Path(tempfile.mkdtemp(prefix="regdpo-bench-ingest-"))
    times: dict[str, list[float]] = {"ingest": [], "pyav": []}
    cpu: dict[str, list[float]] = {"ingest": [], "pyav": []}  # process CPU seconds: robust to other load
    clips = frames = 0
    try:
        for i in range(args.repeats):
            cfg = config_from_dict({"workdir": str(tmp / f"w{i}"), "model": {"preset": "tiny"}, "video": video,
                                    "ingest": {"manifest": str(args.manifest), "min_side": min(args.size, 32)}})
            start, start_cpu = time.perf_counter(), time.process_time()
            result = run(cfg, "ingest")
            times["ingest"].append(time.perf_counter() - start)
            cpu["ingest"].append(time.process_time() - start_cpu)
            clips = result.summary["num_clips"]
            start, start_cpu = time.perf_counter(), time.process_time()
            frames = pyav_decode_resize(files, **video)
            times["pyav"].append(time.perf_counter() - start)
            cpu["pyav"].append(time.process_time() - start_cpu)
            shutil.rmtree(tmp / f"w{i}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ingest_s, pyav_s = statistics.median(times["ingest"]), statistics.median(times["pyav"])
    out_frames = clips * args.frames
    figures = {
        "files": len(files), "clips": clips, "frames_per_clip": args.frames, "size": args.size,
        "pyav_frames_made": frames, "repeats": args.repeats,
        "ingest_s_median": round(ingest_s, 4), "pyav_s_median": round(pyav_s, 4),
        "ingest_frames_per_s": round(out_frames / ingest_s, 1), "pyav_frames_per_s": round(frames / pyav_s, 1),
        "ingest_over_pyav": round((out_frames / ingest_s) / (frames / pyav_s), 3),
        "ingest_cpu_s_median": round(statistics.median(cpu["ingest"]), 4),
        "pyav_cpu_s_median": round(statistics.median(cpu["pyav"]), 4),
        "ingest_over_pyav_cpu": round((out_frames / statistics.median(cpu["ingest"]))
                                      / (frames / statistics.median(cpu["pyav"])), 3),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
    }
    print(f"{'variant':<8} {'median s':>9} {'frames/s':>9}")
    print(f"{'ingest':<8} {ingest_s:9.3f} {figures['ingest_frames_per_s']:9.1f}   ({clips} clips x {args.frames} frames, mp4s written)")
    print(f"{'pyav':<8} {pyav_s:9.3f} {figures['pyav_frames_per_s']:9.1f}   ({frames} frames picked and resized)")
    print(f"ingest_over_pyav = {figures['ingest_over_pyav']} (goal >= 0.8); "
          f"on process CPU time: {figures['ingest_over_pyav_cpu']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
