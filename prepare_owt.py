"""
Tokenise OpenWebText (or any text dataset) into train.bin / val.bin for train.py.

    python prepare_owt.py                                   # OpenWebText from the hub -> data/openwebtext
    python prepare_owt.py --dataset ../shared/data/tinyshakespeare.txt --out data/shakespeare
    python prepare_owt.py --dataset corpus.jsonl --text_column body --out data/mine
    python prepare_owt.py --dataset some/hf-dataset --split train --text_column text --out data/x

Output, in --out:
  train.bin, val.bin  GPT-2 BPE token ids as a flat uint16 array (np.memmap), each
                      document followed by the end-of-text token 50256
  meta.json           tokenizer, dtype, vocab size, per split the token count and the sha256
                      of the whole file and of its first MiB, document counts, source
  .verified.json      the files already checked against meta.json (see data.py)

An --out prepared by an older version (no whole-file checksums in meta.json) is refused by
train.py; --record_checksums adds them without tokenising again, after checking the files'
sizes, header checksums and token ids.

Documents. A hub dataset, .jsonl or .parquet file: one row is one document (the
--text_column). A .txt file: --txt_docs says what a document is:
  paragraph (default)  the text between blank lines (the blank lines themselves are dropped)
  file                 the whole file (give a directory or several files for many documents)
  line                 every non-empty line

Safety. The whole output is built in a temp directory beside --out and renamed into
place at the end, so an interrupted run (Ctrl-C, a kill, a full disk) leaves the
previous output, or none, never a mixture; just run the command again (the
tokenisation of a hub dataset is cached by `datasets` and is not redone). Until that
rename the disk holds the old output and the new one. A finished output is detected
and left alone unless --overwrite. A second run for the same --out waits for the first.

The work itself lives in corpus.py (corpus.prepare); this file is its command line.
"""
from __future__ import annotations

import storage  # first: stdlib only, so that Ctrl-C while torch loads is one line

if __name__ == "__main__":
    storage.exit_quietly_on_ctrl_c()

import os
import sys

from corpus import TXT_DOCS, prepare
from data import OWT, DataError, record_checksums
from runtime import ArgumentParser
from storage import DiskFull, UnusableDirectory, unusable_directory


class ExitError(SystemExit):
    """Exit status 2 once the one-line message is on stderr; str() is the message, as for sys.exit(msg)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(
        description="Tokenise a text dataset with the GPT-2 BPE into train.bin / val.bin (uint16) + meta.json.",
        epilog="Examples: python prepare_owt.py  (OpenWebText, ~9B tokens, ~17 GB)  |  "
               "python prepare_owt.py --dataset ../shared/data/tinyshakespeare.txt --out data/shakespeare")
    p.add_argument("--dataset", default=OWT,
                   help=f"Hugging Face dataset name, or a local .txt/.jsonl/.parquet file, directory or glob "
                        f"(default: {OWT})")
    p.add_argument("--out", default="data/openwebtext", help="output directory (default: data/openwebtext)")
    p.add_argument("--text_column", default="text", help="column holding the text (default: text)")
    p.add_argument("--split", default="train", help="split of a hub dataset to read (default: train)")
    p.add_argument("--config", default=None, help="configuration name of a hub dataset, if it has several")
    p.add_argument("--val_fraction", type=float, default=0.0005,
                   help="fraction of documents held out for val.bin (default: 0.0005, as nanoGPT)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="processes for tokenisation (default: half the CPU cores)")
    p.add_argument("--txt_docs", choices=TXT_DOCS, default="paragraph",
                   help="what one document of a .txt file is: paragraph (text between blank lines, default), "
                        "file, or line")
    p.add_argument("--seed", type=int, default=2357, help="seed of the random validation split")
    p.add_argument("--overwrite", action="store_true", help="redo a finished output")
    p.add_argument("--record_checksums", action="store_true",
                   help="add the whole-file checksums to the meta.json of an --out an older version prepared, "
                        "after checking the files' sizes, header checksums and token ids (nothing is tokenised)")
    args = p.parse_args(argv)
    try:
        if args.record_checksums:
            record_checksums(args.out)
        else:
            prepare(args.dataset, args.out, args.text_column, args.split, args.config, args.val_fraction,
                    args.num_proc, args.txt_docs, args.seed, args.overwrite)
    except (DataError, DiskFull, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, (DiskFull, UnusableDirectory)):
            e = unusable_directory(e, args.out, "--out")          # it cannot be created or written
        message = f"error: {e}"
        print(message, file=sys.stderr)
        if isinstance(e, DiskFull) or getattr(e, "machine", False):
            raise SystemExit(1) from None       # the machine's fault (a full disk, a read-only mount)
        raise ExitError(message) from None
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} is as it was before this run", file=sys.stderr)
        raise


if __name__ == "__main__":
    storage.restore_ctrl_c()
    try:
        main()
    except KeyboardInterrupt:
        # The output is already rolled back. Leave without the interpreter's shutdown, where a
        # progress bar that Ctrl-C cut short inside its constructor prints a traceback from __del__.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
