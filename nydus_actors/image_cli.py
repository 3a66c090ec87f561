"""`nydus-actors image create`: build a RAFS v6 bootstrap and blob, with nydus-image's flags.

Errors print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from nydus_actors.rafs.builder import DEFAULT_CHUNK_SIZE, BuildError, build, check_chunk_size
from nydus_actors.rafs.builder.codec import COMPRESSORS, DIGESTERS

_TYPES = ("auto", "dir-rafs", "tar-rafs", "targz-rafs")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _chunk_size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid chunk size {text!r}") from None
    try:
        check_chunk_size(value)
    except BuildError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nydus-actors image", description="Build Nydus RAFS v6 images.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("create", help="build a bootstrap and a blob from a directory or a layer tarball")
    c.add_argument("source", metavar="SOURCE", help="directory, or OCI layer .tar / .tar.gz / .tgz")
    c.add_argument("-B", "--bootstrap", required=True, help="bootstrap file to write")
    c.add_argument("-D", "--blob-dir", required=True, help="directory receiving the blob, named by its id")
    c.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE, help="default 0x100000")
    c.add_argument(
        "-c",
        "--compressor",
        choices=sorted(COMPRESSORS),
        default="zstd",
        help="default zstd as in nydus-image; with none the blob doubles as a kernel device",
    )
    c.add_argument(
        "--digester", choices=sorted(DIGESTERS), default="blake3", help="chunk digest, default blake3"
    )
    c.add_argument("-t", "--type", choices=_TYPES, default="auto", help="source kind; auto detects it")
    c.add_argument("-v", "--fs-version", choices=["6"], default="6", help="only RAFS v6 is written")
    c.add_argument("-J", "--output-json", help="also write {bootstrap, blobs, ...} as JSON here")
    return p


def main(argv: list[str]) -> int:
    """Run `image <command> ...`; return the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as ex:
        print(f"nydus-actors image: {ex}", file=sys.stderr)
        return 1
    except SystemExit as ex:
        # --help: argparse has printed the text and wants to exit.
        return ex.code if isinstance(ex.code, int) else 0
    want_dir = args.type == "dir-rafs"
    if args.type != "auto" and os.path.exists(args.source) and os.path.isdir(args.source) != want_dir:
        kind = "a directory" if want_dir else "a tar archive"
        print(f"nydus-actors image: --type {args.type} needs {kind} as SOURCE", file=sys.stderr)
        return 1
    try:
        result = build(
            args.source,
            args.bootstrap,
            args.blob_dir,
            chunk_size=args.chunk_size,
            compressor=args.compressor,
            digester=args.digester,
            progress=sys.stderr,
        )
        if args.output_json:
            summary = {
                "version": "nydus-actors",
                "bootstrap": result.bootstrap,
                "blobs": [result.blob_id],
                "chunk_count": result.chunk_count,
                "compressed_size": result.compressed_size,
                "uncompressed_size": result.uncompressed_size,
            }
            try:
                with open(args.output_json, "w") as f:
                    json.dump(summary, f, indent=2)
                    f.write("\n")
            except OSError as ex:
                raise BuildError(f"{args.output_json}: {ex.strerror}") from None
    except BuildError as ex:
        print(f"nydus-actors image: {ex}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nydus-actors image: interrupted", file=sys.stderr)
        return 1
    print(result.blob_id)
    return 0
