"""The ``jest-stream`` command line.

Each subcommand is one entry of :data:`COMMANDS`: a function that adds its parser to
the subparsers and sets ``run(args) -> exit status``. Add a command by writing one
such function and listing it there.

    jest-stream annotate   a reference model's outputs for every sample, into a cache
    jest-stream validate   check every shard and sample of a local MDS dataset
    jest-stream report     summaries and plots of a selection log
    jest-stream export     the ids a selection log selected most (or least) often
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from jest_stream.cache import DEFAULT_PART_SIZE, OUTPUT_GROUPS
from jest_stream.errors import JestStreamError

__all__ = ['main', 'build_parser', 'COMMANDS']

# Errors that come from the user's settings or files: shown as one message, no traceback.
# Every error jest_stream raises is a JestStreamError; an OSError names the file it could
# not open (a --checkpoint that does not exist).
_USER_ERRORS = (JestStreamError, OSError)


def _add_annotate(subparsers: argparse._SubParsersAction) -> None:
    parser = _subcommand(subparsers, 'annotate')
    data = parser.add_argument_group('dataset')
    data.add_argument('--local', required=True, help='local folder of the MDS dataset')
    data.add_argument('--remote', help='remote location of its shards, if any')
    data.add_argument('--split', help='split of the dataset, if any')
    model = parser.add_argument_group('reference model')
    model.add_argument('--model', required=True, metavar='PACKAGE.MODULE:FACTORY',
                       help='import path of a function that returns the nn.Module')
    model.add_argument('--model-kwargs', type=json.loads, default={}, metavar='JSON',
                       help='keyword arguments of the factory, as a JSON object')
    model.add_argument('--checkpoint', help='state_dict file to load into the model '
                       '(torch.save(model.state_dict(), path))')
    model.add_argument('--forward', metavar='PACKAGE.MODULE:FUNCTION',
                       help='forward(model, batch) -> logits (loss) or (image_emb, text_emb, '
                       'temperature, bias) (embeddings); by default the model is called on '
                       'the input (or image and text) columns')
    model.add_argument('--transform-id', required=True,
                       help='your name for the input transform the reference sees; the cache '
                       'is only opened for the same name')
    outputs = parser.add_argument_group('outputs')
    outputs.add_argument('--outputs', choices=sorted(OUTPUT_GROUPS), default='loss',
                         help='per-example loss (float32) or image and text embeddings (float16)')
    outputs.add_argument('--input-key', help='column of the inputs (loss)')
    outputs.add_argument('--target-key', help='column of the targets (loss)')
    outputs.add_argument('--image-key', default='image', help='column of the images (embeddings)')
    outputs.add_argument('--text-key', default='text', help='column of the texts (embeddings)')
    outputs.add_argument('--out', required=True, help='folder of the reference cache')
    outputs.add_argument('--part-size', type=int, default=DEFAULT_PART_SIZE,
                         help='samples per part file, the unit of resumption')
    run = parser.add_argument_group('execution')
    run.add_argument('--batch-size', type=int, default=256, help='samples per forward pass')
    run.add_argument('--workers', type=int, default=2, help='DataLoader workers reading samples')
    run.add_argument('--device', default='cpu', help='device of the model, e.g. cuda:0')
    run.add_argument('--no-progress', action='store_true', help='no progress bar')
    run.add_argument('--lock-timeout', type=float, default=0.0, metavar='SECONDS',
                     help='when another run writes the same --out, wait this long for it to '
                     'finish (default 0: refuse at once, naming the other run)')
    run.add_argument('--timeout', type=float, default=300.0, metavar='SECONDS',
                     help='wait at most this long for each batch from the --workers before '
                     'failing (default 300; 0: no timeout)')
    run.add_argument('--keep-shared-memory', action='store_true',
                     help="do not remove the shared memory that killed streaming jobs left "
                     '(removed by default: only segments no live process uses)')
    parser.set_defaults(run=_run_annotate)


def _run_annotate(args: argparse.Namespace) -> int:
    if not args.keep_shared_memory:
        from jest_stream.shm import remove_stale_shared_memory

        # Segments of killed earlier runs only: streaming jobs running now keep theirs.
        remove_stale_shared_memory()
    from jest_stream.cache import annotate, import_object, load_model

    reference = load_model(args.model, checkpoint=args.checkpoint, kwargs=args.model_kwargs)
    forward = import_object(args.forward) if args.forward else None
    try:
        result = annotate(
            out=args.out, model=reference, transform_id=args.transform_id, outputs=args.outputs,
            local=args.local, remote=args.remote, split=args.split, forward=forward,
            input_key=args.input_key, target_key=args.target_key, image_key=args.image_key,
            text_key=args.text_key, batch_size=args.batch_size, num_workers=args.workers,
            device=args.device, part_size=args.part_size, progress=not args.no_progress,
            lock_timeout=args.lock_timeout, timeout=args.timeout,
            info={'model': args.model, 'checkpoint': args.checkpoint, 'forward': args.forward})
    except KeyboardInterrupt:
        print('interrupted: finished parts are kept; run the same command again to continue',
              file=sys.stderr)
        return 130
    fp = result.fingerprint
    print(f'annotated {result.num_samples} samples into {result.path}: '
          f'{result.parts_written} parts written, {result.parts_skipped} already done, '
          f'{result.seconds:.1f} s')
    print(f'fingerprint: dataset {fp.dataset[:16]}..., model {fp.model}, '
          f'transform {fp.transform!r}')
    print(f"open it with ReferenceCache({str(result.path)!r}, dataset=..., "
          f"model_checksum={fp.model!r}, transform={fp.transform!r})")
    return 0


def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    parser = _subcommand(subparsers, 'validate')
    parser.add_argument('path', metavar='DIR', help='the folder holding index.json')
    parser.add_argument('--allow-unsafe-types', action='store_true',
                        help='decode pickled columns too (runs the pickled code)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--samples-shown', type=int, default=8, metavar='N',
                        help='bad samples listed per shard (default 8)')
    parser.set_defaults(run=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from jest_stream.shards import validate_mds

    report = validate_mds(args.path, allow_unsafe_types=args.allow_unsafe_types,
                          progress=not args.no_progress)
    for shard in report.shards:
        checked = '+'.join(shard.hashes) if shard.hashes else 'no hash'
        status = 'ok' if shard.ok else 'DAMAGED'
        print(f'{shard.name}  {shard.samples} samples  {shard.bytes} bytes  {checked}  {status}')
    for problem in report.problems:
        print(f'{report.path}: {problem}', file=sys.stderr)
    if report.shards and not report.hashes_recorded:
        print(f'note: {report.path}/index.json does not record a hash for every shard (written '
              f'without MDSWriter(hashes=[...])): they were checked by size, structure and '
              f'decoding only', file=sys.stderr)
    for shard in report.bad_shards:
        for problem in shard.problems:
            print(f'{shard.name}: {problem}', file=sys.stderr)
        for index, problem in shard.bad_samples[:args.samples_shown]:
            print(f'{shard.name}: sample {index}: {problem}', file=sys.stderr)
        if len(shard.bad_samples) > args.samples_shown:
            print(f'{shard.name}: ... {len(shard.bad_samples) - args.samples_shown} more bad '
                  f'samples', file=sys.stderr)
    bad = report.bad_shards
    print(f'{len(report.shards)} shards, {report.num_samples} samples: '
          f'{len(report.shards) - len(bad)} ok, {len(bad)} damaged')
    if report.ok:
        return 0
    names = ', '.join(shard.name for shard in bad) or 'the index'
    print(f'jest-stream: error: {report.path} is damaged ({names}); re-download or rewrite '
          f'the damaged shards', file=sys.stderr)
    return 1


# Every subcommand's one-line help and description.
_HELP = {
    'annotate': (
        "store a frozen reference model's outputs for every sample",
        "Compute a frozen reference model's per-example loss or embeddings for every sample of "
        'a StreamingDataset once, and store them in a reference cache keyed by global sample id '
        '(see jest_stream.cache.ReferenceCache). Interrupted runs continue where they stopped '
        'when started again with the same arguments.'),
    'validate': (
        'check every shard and sample of a local MDS dataset',
        'Check an MDS dataset folder: index.json parses and matches the shard files present; '
        'each shard has its recorded size, hashes (when the index records them), a sound '
        'offsets table and column config; every sample has the size its columns need and '
        'decodes. Prints one line per shard and exits with status 1 naming each damaged shard '
        'and sample.'),
    'report': (
        'summaries and plots of a selection log',
        'Read a selection log (jest_stream.log.SelectionLog) and write report.json, PNG plots '
        '(score quantiles over time, shares of each group among the selected, how often each '
        'sample was selected, learner against reference losses, the share of flagged samples '
        'among the selected) and index.html, which shows them. Prints the summary.'),
    'export': (
        'the ids a selection log selected most (or least) often',
        'Rank the samples of a selection log by how often selection took them when they were '
        'candidates, and write the ids of the top (or bottom) fraction as .npy or .parquet: a '
        'curated subset to train on (read it back with jest_stream.export.read_ids and '
        'SampleSubset).'),
}


def _subcommand(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``, with its help and description from :data:`_HELP`."""
    summary, description = _HELP[name]
    return subparsers.add_parser(name, help=summary, description=description)


def _log_command(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A subcommand that reads a selection log: its LOGDIR argument."""
    parser = _subcommand(subparsers, name)
    parser.add_argument('log', metavar='LOGDIR', help='the folder of the selection log')
    return parser


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = _log_command(subparsers, 'report')
    parser.add_argument('--out', help='folder of the report (default: LOGDIR/report)')
    parser.add_argument('--window', type=int, metavar='STEPS',
                        help='steps per window of the curves (default: about 50 windows)')
    parser.add_argument('--groups', nargs='*', metavar='COLUMN',
                        help='logged columns to show the shares of (default: stream and '
                        'columns with few integer or string values)')
    parser.add_argument('--flags', nargs='*', metavar='COLUMN',
                        help='logged flag columns (bool or 0/1, e.g. a noise flag; default: '
                        'all of them)')
    parser.add_argument('--max-points', type=int, default=5000,
                        help='points of the learner-reference scatter (default 5000)')
    parser.add_argument('--no-plots', action='store_true',
                        help='only report.json and the printed summary (no matplotlib needed)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jest_stream.report import write_report

    out = Path(args.out) if args.out else Path(args.log) / 'report'
    report = write_report(args.log, out, window=args.window, groups=args.groups,
                          flags=args.flags, max_points=args.max_points,
                          plots=not args.no_plots, progress=not args.no_progress)
    print(json.dumps(report['summary'], indent=1))
    counts = report['counts']
    if counts['samples']:
        print(f'{counts["samples"]} samples were candidates; '
              f'{counts["never_selected_fraction"]:.1%} were never selected')
    for column, flagged in report['flags'].items():
        if flagged['kept_ratio'] is not None:
            print(f'{column}: {flagged["overall"]["selected"]:.1%} of the selected, '
                  f'{flagged["overall"]["candidates"]:.1%} of the candidates')
    print(f'wrote {", ".join(report["files"])} to {out}')
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = _log_command(subparsers, 'export')
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument('--top', type=float, metavar='FRACTION',
                       help='keep this fraction of the samples, the most selected')
    which.add_argument('--bottom', type=float, metavar='FRACTION',
                       help='keep this fraction, the least selected')
    parser.add_argument('--out', required=True, help='ids file: .npy or .parquet')
    parser.add_argument('--min-candidates', type=int, default=1, metavar='N',
                        help='rank only samples that were candidates at least N times')
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from jest_stream.export import export_ids

    result = export_ids(args.log, args.out, top=args.top, bottom=args.bottom,
                        min_candidates=args.min_candidates)
    rates = '' if result['rate_chosen'] is None else (
        f' (mean selection rate {result["rate_chosen"]:.3f}, against '
        f'{result["rate_ranked"]:.3f} over all ranked samples)')
    print(f'wrote {result["ids"]} of {result["ranked"]} ranked sample ids to '
          f'{result["path"]}{rates}')
    return 0


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_annotate, _add_validate, _add_report, _add_export)


def build_parser() -> argparse.ArgumentParser:
    """The ``jest-stream`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog='jest-stream',
        description='jest_stream: joint example selection over mosaicml-streaming datasets.')
    subparsers = parser.add_subparsers(title='commands', metavar='COMMAND')
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jest-stream`` with ``argv`` (the process arguments by default); the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, 'run'):
        parser.print_help(sys.stderr)
        return 2
    # Like `python -m`, find the user's model and forward modules in the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return args.run(args)
    except _USER_ERRORS as error:
        message = ' '.join(line.strip() for line in str(error).splitlines()) or repr(error)
        print(f'jest-stream: error: {message}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
