"""Prune a model and publish the checkpoint on the Hugging Face Hub with a generated model card.

Without `--checkpoint`, the model (default: the embedded SmolLM2-135M-Instruct) is pruned and saved to `--output-dir`,
then `OlicaPruner.push_to_hub(repo_id, private=..., token=...)` writes the model card (`README.md`: base model and
license, recipe, parameters before and after, calibration data, recorded evaluations, how to load it with and without
the plugin) and uploads the folder. With `--checkpoint DIR`, an existing pruned folder is published as it is
(`optimum_olica.hub.push_to_hub`). Record evaluations first (`optimum-cli olica eval DIR --record`) for them to show
on the card.

Needs a token with write access (`hf auth login`, `HF_TOKEN`, or `--token`); without one, or without network, the
error says so and the local folder is left as it was. `--dry-run` needs neither: it checks the arguments, and with
`--checkpoint` reads the folder, lists the files that would be uploaded and prints the model card it would write,
without writing it.

Usage:
    python examples/publish_to_hub.py USER/smollm2-olica-20 [--ratio 0.2] [--output-dir outputs/smollm2-olica-20]
    python examples/publish_to_hub.py USER/my-pruned-model --checkpoint outputs/smollm2-olica-20 [--private] [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DEFAULT_MODEL_ALIAS = "default"
CARD_PREVIEW_LINES = 40
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo_id", help="the Hub repository, USER/NAME or ORG/NAME (created if missing)")
    source = parser.add_argument_group("what to publish")
    source.add_argument("--checkpoint", type=Path, default=None,
                        help="publish this pruned folder as it is, instead of pruning")
    source.add_argument("--model", default=DEFAULT_MODEL_ALIAS,
                        help="model to prune: Hub id, local folder, or 'default' (embedded SmolLM2-135M-Instruct)")
    source.add_argument("--ratio", type=float, default=0.2, help="fraction of ALL parameters to remove (default 0.2)")
    source.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default 128)")
    source.add_argument("--output-dir", type=Path, default=None,
                        help="where the pruned checkpoint is saved before upload (default outputs/<repo name>)")
    source.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--private", action="store_true", help="create the repository as private")
    hub.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    hub.add_argument("--base-model", default=None,
                     help="the base model's Hub id for the card, when the model was pruned from a local copy")
    hub.add_argument("--license", default=None, help="license id for the card (default: the base model's license)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the model card; no token or network needed")
    args = parser.parse_args(argv)

    if not _REPO_ID.match(args.repo_id):
        parser.error(f"repo_id {args.repo_id!r} must look like USER/NAME (letters, digits, '-', '_', '.').")
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            parser.error(f"--checkpoint {args.checkpoint} is not a folder; give the folder written by the pruner.")
    else:
        if not 0.0 < args.ratio < 1.0:
            parser.error(f"--ratio must be in (0, 1), got {args.ratio}.")
        if args.output_dir is None:
            args.output_dir = Path("outputs") / args.repo_id.split("/")[1]
        if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not args.overwrite:
            parser.error(f"--output-dir {args.output_dir} is not empty; pass --overwrite or choose another path.")
    return args


def token_status(token: str | None) -> str:
    from huggingface_hub import get_token

    if token:
        return "given with --token"
    return "found (HF_TOKEN or `hf auth login`)" if get_token() else "none found: log in with `hf auth login` first"


def dry_run(args: argparse.Namespace) -> None:
    print(f"repository: {args.repo_id} ({'private' if args.private else 'visibility: account default'})")
    print(f"token: {token_status(args.token)}")
    if args.checkpoint is None:
        print(f"would prune {args.model} by {args.ratio:.0%} ({args.num_samples} calibration sequences), save to "
              f"{args.output_dir.resolve()}, write the model card there and upload the folder")
        print("dry run: arguments are fine (pass --checkpoint DIR to preview the card of an existing folder).")
        return

    from optimum_olica.hub import build_model_card, files_to_upload
    from optimum_olica.inspection import OlicaCheckpoint

    try:
        checkpoint = OlicaCheckpoint.from_directory(args.checkpoint)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    card = build_model_card(checkpoint, repo_id=args.repo_id, base_model=args.base_model, license=args.license)
    files = files_to_upload(checkpoint.directory)
    if "README.md" not in files:
        files = sorted(files + ["README.md"])  # the card is written into the folder before the upload
    print(f"checkpoint: {checkpoint.directory}")
    print(f"files to upload ({len(files)}): {', '.join(files)}")
    card_lines = str(card).splitlines()
    print(f"model card (README.md, {len(card_lines)} lines; first {CARD_PREVIEW_LINES}):")
    for line in card_lines[:CARD_PREVIEW_LINES]:
        print(f"  | {line}")
    print("dry run: nothing was written or uploaded.")


def run(args: argparse.Namespace) -> None:
    from optimum_olica.hub import HubUploadError

    try:
        if args.checkpoint is not None:
            from optimum_olica.hub import push_to_hub

            url = push_to_hub(
                args.checkpoint, args.repo_id, private=args.private or None, token=args.token,
                base_model=args.base_model, license=args.license,
            )
        else:
            url = prune_and_push(args)
    except HubUploadError as error:  # no token, no network, or a refused request: the local folder is intact
        sys.exit(f"error: {error}")
    print(f"Published: {url}")


def prune_and_push(args: argparse.Namespace) -> str:
    from huggingface_hub import get_token

    from optimum_olica import OlicaConfig, OlicaPruner
    from optimum_olica.hub import HubUploadError

    # Fail before minutes of pruning when the upload cannot happen anyway.
    if not (args.token or get_token()):
        raise HubUploadError(
            "No Hugging Face token found: log in with `hf auth login`, set HF_TOKEN or pass --token. Nothing was "
            "pruned or uploaded."
        )
    model = args.model
    if model == DEFAULT_MODEL_ALIAS:
        from optimum_olica.default_model import default_model_path

        # A float32 copy dequantised from a Q4_1 GGUF, not the Hub weights: the card names a Hub base model only
        # when --base-model says so.
        model = default_model_path()
    pruner = OlicaPruner.from_pretrained(model)
    pruner.prune(
        OlicaConfig(ratio=args.ratio, num_samples=args.num_samples),
        save_directory=args.output_dir, overwrite=args.overwrite,
    )
    print(f"Saved to {args.output_dir.resolve()}; uploading to {args.repo_id}...")
    return pruner.push_to_hub(
        args.repo_id, private=args.private or None, token=args.token, base_model=args.base_model, license=args.license
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry_run(args) if args.dry_run else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
