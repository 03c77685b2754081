"""``python -m meshd.cli.download NAME``: one model download from a shell.

It downloads as the daemon would (the same gate, disk check, resume and
verification: :class:`~meshd.models.download.Downloader`), gating on the VRAM
given with ``--vram-gb`` or ``[node] vram_gb``, since GPU detection is the
daemon's job.  Exit status: 0 done (the model's path is printed), 2 bad usage
or an entry that names nothing downloadable, 3 refused by the gate or the
disk check, 4 the download failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from meshd import config as config_mod
from meshd.models.catalog import load_catalog
from meshd.models.download import Downloader, DownloadRefused
from meshd.models.scan import LocalModel, ModelError
from meshd.units import bytes_of_gib

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_FAILED = 0, 2, 3, 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshd.cli.download",
        description="Download one model from a shell, as the daemon would (gate, disk check, resume).",
    )
    p.add_argument("entry", help="catalog name or hf:OWNER/REPO/FILE.gguf")
    p.add_argument("--config", help="meshd.toml (default: $MESHD_CONFIG or /etc/meshd.toml)")
    p.add_argument("--models-dir", help="default: [node] models_dir")
    p.add_argument("--cache-dir", help="partial downloads (default: [node] state_dir/downloads)")
    p.add_argument("--vram-gb", type=float, help="VRAM in GiB to gate on (default: [node] vram_gb)")
    p.add_argument("--min-free-gb", type=float, help="GiB to leave free (default: [models] min_free_gb)")
    p.add_argument("--split-peers", action="store_true", help="peers will share the model")
    p.add_argument("--catalog", help="catalog file (default: the one shipped with meshd)")
    p.add_argument("--progress-json", action="store_true",
                   help="print one JSON line per progress update on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    from twisted.internet import task

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = config_mod.load(args.config)
        if args.min_free_gb is not None:
            cfg = cfg.replace("models", min_free_gb=args.min_free_gb)
        catalog = load_catalog(args.catalog)
    except Exception as e:  # noqa: BLE001 - ConfigError / CatalogError: one line each
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    vram_gb = args.vram_gb if args.vram_gb is not None else cfg.node.vram_gb
    if vram_gb is None:
        print("give --vram-gb (or [node] vram_gb): GPU detection is the daemon's job",
              file=sys.stderr)
        return EXIT_USAGE
    result: dict[str, int] = {}

    def run(reactor: Any) -> defer.Deferred[None]:
        downloader = Downloader(
            cfg, reactor=reactor, vram_bytes=lambda: bytes_of_gib(vram_gb),
            models_dir=args.models_dir, cache_dir=args.cache_dir, catalog=catalog,
        )
        if args.progress_json:
            def show(name: str) -> None:
                for row in downloader.downloads.to_status():
                    print(json.dumps(row), flush=True)
            downloader.downloads.listeners.append(show)
        d = downloader.download(args.entry, split_peers_available=args.split_peers)

        def ok(model: LocalModel) -> None:
            print(model.path, flush=True)
            result["rc"] = EXIT_OK

        def bad(f: Failure) -> None:
            print(str(f.value), file=sys.stderr)
            if f.check(DownloadRefused):
                result["rc"] = EXIT_REFUSED
            elif f.check(ModelError):
                result["rc"] = EXIT_USAGE
            else:
                result["rc"] = EXIT_FAILED

        return d.addCallbacks(ok, bad)

    try:
        task.react(run)
    except SystemExit:
        pass
    return result.get("rc", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
