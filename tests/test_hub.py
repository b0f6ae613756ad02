"""Hub publishing: the model card, the file set, and the upload itself against a local HTTP endpoint.

The real Hub is unreachable here, so `RecordingHub` (stdlib ``http.server`` in a thread) answers the part of the Hub
protocol that huggingface_hub's ``create_repo`` + ``upload_folder`` use, read from huggingface_hub 2.x's source
(``hf_api.py``, ``_commit_api.py``, ``lfs.py``):

1. ``POST /api/repos/create`` (JSON ``{"name", "organization", "visibility"?}``) -> ``{"url"}``;
2. ``POST /api/validate-yaml`` (the README's metadata) -> no errors;
3. ``POST /api/models/{repo}/preupload/{revision}`` (path, size, base64 sample per file) -> an upload mode per file:
   ``lfs`` for ``*.safetensors`` (as the Hub's default .gitattributes says), ``regular`` for the rest;
4. for LFS files, ``POST /{repo}.git/info/lfs/objects/batch`` -> a basic-transfer upload URL per object, then
   ``PUT`` of the bytes to it (huggingface_hub prefers the Xet protocol when ``hf_xet`` is installed; the test turns
   that off, since Xet talks to a separate content-addressed store);
5. ``POST /api/models/{repo}/commit/{revision}`` (ndjson: a header line, then one line per file: regular files inline
   in base64, LFS files by sha256 and size) -> ``{"commitUrl", "commitOid"}``.

Any other request gets a 404 and is recorded, so the tests see it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from optimum_olica import OlicaConfig, OlicaPruner
from optimum_olica.hub import (
    CARD_MARKER,
    HubUploadError,
    build_model_card,
    files_to_upload,
    push_to_hub,
    write_model_card,
)
from optimum_olica.inspection import record_evaluation
from tiny_checkpoint import make_tiny_tokenizer

from conftest import make_tiny_model

REPO_ID = "someone/tiny-olica"


class RecordingHub:
    """A local stand-in for the Hub's upload endpoints that records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lfs_objects: dict[str, bytes] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload: dict | None = None) -> None:
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                hub.requests.append({"method": self.command, "path": path, "body": body,
                                     "authorization": self.headers.get("Authorization")})
                hub.answer(self, path, body)

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, handler, path: str, body: bytes) -> None:
        if handler.command == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            return handler._reply(200, {"url": f"{self.endpoint}/{request['organization']}/{request['name']}"})
        if handler.command == "POST" and path == "/api/validate-yaml":
            return handler._reply(200, {"errors": [], "warnings": []})
        if handler.command == "POST" and path == f"/api/models/{REPO_ID}/preupload/main":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                      "shouldIgnore": False, "oid": None} for f in files]
            return handler._reply(200, {"files": modes})
        if handler.command == "POST" and path == f"/{REPO_ID}.git/info/lfs/objects/batch":
            objects = json.loads(body)["objects"]
            return handler._reply(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects
            ]})
        if handler.command == "PUT" and path.startswith("/lfs-upload/"):
            self.lfs_objects[path.rsplit("/", 1)[1]] = body
            return handler._reply(200)
        if handler.command == "POST" and path == f"/api/models/{REPO_ID}/commit/main":
            return handler._reply(200, {"commitUrl": f"{self.endpoint}/{REPO_ID}/commit/{'a' * 40}",
                                        "commitOid": "a" * 40})
        if handler.command == "GET" and path == "/api/models/base-org/base-model":
            return handler._reply(200, {"id": "base-org/base-model", "cardData": {"license": "llama3.1"}})
        return handler._reply(404, {"error": f"not served by the test hub: {handler.command} {path}"})

    def commit_lines(self) -> list[dict]:
        (commit,) = [r for r in self.requests if r["path"].endswith("/commit/main")]
        return [json.loads(line) for line in commit["body"].decode().splitlines()]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruner that has pruned a tiny model and saved it; returns (pruner, folder)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    pruner = OlicaPruner(model, tokenizer)
    calibration = torch.randint(3, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    directory = tmp_path_factory.mktemp("hub") / "tiny-olica"
    config = OlicaConfig(ratio=0.25, num_calibrated_layers=1, refit_damping=0.1)
    pruner.prune(config, calibration_dataset=calibration, save_directory=directory, progress=False, device="cpu")
    return pruner, directory


@pytest.fixture
def checkpoint_copy(pruned, tmp_path):
    """A private copy of the saved checkpoint (tests that write the card or the report must not share one)."""
    import shutil

    return Path(shutil.copytree(pruned[1], tmp_path / "tiny-olica"))


@pytest.fixture
def no_xet(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_card_holds_metadata_recipe_parameters_calibration_and_loading(checkpoint_copy):
    report = json.loads((checkpoint_copy / "olica_report.json").read_text())
    card = build_model_card(checkpoint_copy, repo_id=REPO_ID, base_model="HuggingFaceTB/SmolLM2-135M",
                            license="apache-2.0")
    metadata = card.data.to_dict()
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"optimum-olica", "pruning", "llama"} <= set(metadata["tags"])
    text = card.text
    assert f"{report['parameters_before']:,} -> {report['parameters_after']:,}" in text
    assert f"{100 * report['achieved_ratio']:.2f}% of the parameters removed" in text
    assert "| `ratio` | `0.25` |" in text and "| `refit_damping` | `0.1` |" in text
    assert "8 sequences of 32 tokens (256 tokens) from `Tensor`" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "import optimum_olica" in text
    for record in report["layers"]:
        assert f"| {record['layer']} | {record['query_rank']} | {record['key_rank']} |" in text
    assert "published under its license: `apache-2.0`" in text
    assert "No evaluation was recorded" in text


def test_card_of_a_stock_recipe_describes_what_was_pruned_and_loads_without_the_plugin(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    calibration = torch.randint(3, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    OlicaPruner(model, tokenizer).prune(
        OlicaConfig(ratio=0.2, architecture="stock"), calibration_dataset=calibration,
        save_directory=tmp_path / "stock", progress=False, device="cpu",
    )
    text = build_model_card(tmp_path / "stock", repo_id=REPO_ID).text
    assert "The stock recipe (`architecture=\"stock\"`) prunes only" in text
    assert "factors the query/key projections" not in text
    assert "QK 0.0%, VO 0.0%" in text
    assert "trust_remote_code" not in text and "import optimum_olica" not in text


def test_card_license_comes_from_a_local_base_model_card_else_unknown(checkpoint_copy, tmp_path):
    report_path = checkpoint_copy / "olica_report.json"
    report = json.loads(report_path.read_text())
    base = tmp_path / "base-model"
    base.mkdir()
    report["base_model"] = str(base)
    report_path.write_text(json.dumps(report))

    card = build_model_card(checkpoint_copy)
    assert card.data.to_dict()["license"] == "unknown"
    assert "base_model" not in card.data.to_dict()  # a local path means nothing on the Hub
    assert "could not be read" in card.text

    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    card = build_model_card(checkpoint_copy)
    assert card.data.to_dict()["license"] == "mit"
    assert "published under its license: `mit`" in card.text


@pytest.mark.parametrize("recorded, expected", [("org/base-model", "org/base-model"), ("tiny", None),
                                                ("./models/tiny", None), ("a/b/c", None)])
def test_card_names_the_base_model_only_when_it_is_a_hub_id(checkpoint_copy, recorded, expected):
    report_path = checkpoint_copy / "olica_report.json"
    report = json.loads(report_path.read_text())
    report["base_model"] = recorded
    report_path.write_text(json.dumps(report))
    assert build_model_card(checkpoint_copy).data.to_dict().get("base_model") == expected


def test_card_shows_recorded_perplexity(checkpoint_copy):
    record_evaluation(checkpoint_copy, [{"kind": "perplexity", "dataset": "pride-and-prejudice", "split": "test",
                                         "num_tokens": 1024, "sequence_length": 64, "value": 12.3456}])
    # Recording the same measurement again replaces it rather than adding a second entry.
    record_evaluation(checkpoint_copy, [{"kind": "perplexity", "dataset": "pride-and-prejudice", "split": "test",
                                         "num_tokens": 1024, "sequence_length": 64, "value": 12.5}])
    assert len(json.loads((checkpoint_copy / "olica_report.json").read_text())["evaluations"]) == 1
    text = build_model_card(checkpoint_copy).text
    assert "perplexity 12.500 on pride-and-prejudice (1,024 tokens, windows of 64)" in text


def test_a_hand_written_card_is_kept_and_a_generated_one_refreshed(checkpoint_copy):
    path = write_model_card(checkpoint_copy)
    assert path is not None and CARD_MARKER in path.read_text()
    record_evaluation(checkpoint_copy, [{"kind": "perplexity", "dataset": "x", "num_tokens": 64,
                                         "sequence_length": 64, "value": 3.0}])
    assert "perplexity 3.000" in write_model_card(checkpoint_copy).read_text()
    (checkpoint_copy / "README.md").write_text("# my own card\n")
    assert write_model_card(checkpoint_copy) is None
    assert (checkpoint_copy / "README.md").read_text() == "# my own card\n"


def test_file_set_is_the_checkpoint_without_hidden_or_cache_files(checkpoint_copy):
    (checkpoint_copy / ".olica-tmp-leftover").write_text("x")
    (checkpoint_copy / "__pycache__").mkdir()
    (checkpoint_copy / "__pycache__" / "modeling_olica.cpython-311.pyc").write_bytes(b"\0")
    assert files_to_upload(checkpoint_copy) == sorted([
        "config.json", "configuration_olica.py", "generation_config.json", "model.safetensors", "modeling_olica.py",
        "olica_config.json", "olica_report.json", "tokenizer.json", "tokenizer_config.json",
    ])


def test_upload_sends_the_files_and_card_the_hub_protocol_expects(checkpoint_copy, no_xet):
    with RecordingHub() as hub:
        url = push_to_hub(checkpoint_copy, REPO_ID, private=True, token="hf_test_token", endpoint=hub.endpoint)
    assert url == f"{hub.endpoint}/{REPO_ID}/commit/{'a' * 40}"
    # In order, each kind once (huggingface_hub 2.4 validates the README metadata twice: upload_folder and commit).
    requests = list(dict.fromkeys((r["method"], r["path"]) for r in hub.requests))
    sha = hashlib.sha256((checkpoint_copy / "model.safetensors").read_bytes()).hexdigest()
    assert requests == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO_ID}/preupload/main"),
        ("POST", f"/{REPO_ID}.git/info/lfs/objects/batch"),
        ("PUT", f"/lfs-upload/{sha}"),
        ("POST", f"/api/models/{REPO_ID}/commit/main"),
    ]
    assert all(r["authorization"] == "Bearer hf_test_token" for r in hub.requests if r["path"].startswith("/api"))
    assert json.loads(hub.requests[0]["body"]) == {"name": "tiny-olica", "organization": "someone",
                                                   "visibility": "private"}

    expected_files = files_to_upload(checkpoint_copy)
    assert "README.md" in expected_files
    (preupload_request,) = [r for r in hub.requests if r["path"].endswith("/preupload/main")]
    preupload = json.loads(preupload_request["body"])["files"]
    assert sorted(f["path"] for f in preupload) == expected_files

    lines = hub.commit_lines()
    assert lines[0]["key"] == "header" and lines[0]["value"]["summary"] == "Upload Olica-pruned model"
    inline = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
              for line in lines[1:] if line["key"] == "file"}
    lfs = {line["value"]["path"]: line["value"] for line in lines[1:] if line["key"] == "lfsFile"}
    assert sorted([*inline, *lfs]) == expected_files
    assert inline["olica_config.json"] == (checkpoint_copy / "olica_config.json").read_bytes()
    assert inline["README.md"] == (checkpoint_copy / "README.md").read_bytes()
    assert lfs["model.safetensors"]["oid"] == sha
    assert hub.lfs_objects[sha] == (checkpoint_copy / "model.safetensors").read_bytes()


def test_upload_reads_the_base_model_license_from_the_hub(checkpoint_copy, no_xet):
    with RecordingHub() as hub:
        push_to_hub(checkpoint_copy, REPO_ID, token="hf_test_token", endpoint=hub.endpoint,
                    base_model="base-org/base-model")
    assert ("GET", "/api/models/base-org/base-model") in [(r["method"], r["path"]) for r in hub.requests]
    card = next(line["value"] for line in hub.commit_lines()[1:] if line["value"]["path"] == "README.md")
    text = base64.b64decode(card["content"]).decode()
    assert "license: llama3.1" in text and "base_model: base-org/base-model" in text


def test_pruner_push_to_hub_uploads_the_saved_folder(pruned, no_xet):
    pruner, directory = pruned
    with RecordingHub() as hub:
        pruner.push_to_hub(REPO_ID, token="hf_test_token", endpoint=hub.endpoint)
    assert json.loads(hub.requests[0]["body"]) == {"name": "tiny-olica", "organization": "someone"}
    committed = sorted(line["value"]["path"] for line in hub.commit_lines()[1:])
    assert committed == files_to_upload(directory)


def test_pruner_push_before_saving_says_what_to_do():
    tokenizer = make_tiny_tokenizer()
    pruner = OlicaPruner(make_tiny_model("llama_gqa", vocab_size=len(tokenizer)), tokenizer)
    with pytest.raises(RuntimeError, match="Nothing saved yet"):
        pruner.push_to_hub(REPO_ID, token="hf_test_token")


def test_without_a_token_nothing_is_sent_and_the_checkpoint_is_intact(checkpoint_copy, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = _snapshot(checkpoint_copy)
    with RecordingHub() as hub:
        with pytest.raises(HubUploadError, match="No Hugging Face token") as error:
            push_to_hub(checkpoint_copy, REPO_ID, endpoint=hub.endpoint)
    assert hub.requests == []
    assert "hf auth login" in str(error.value) and "intact" in str(error.value)
    assert _snapshot(checkpoint_copy) == before


def test_without_network_the_error_says_so_and_the_checkpoint_is_intact(checkpoint_copy, no_xet):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    before = {name: data for name, data in _snapshot(checkpoint_copy).items() if name != "README.md"}
    with pytest.raises(HubUploadError) as error:
        push_to_hub(checkpoint_copy, REPO_ID, token="hf_test_token", endpoint=closed)
    message = str(error.value)
    assert "failed" in message and "network" in message and "intact" in message and "ConnectError" in message
    after = _snapshot(checkpoint_copy)
    assert {name: data for name, data in after.items() if name != "README.md"} == before


def test_a_refused_request_names_the_token_problem(checkpoint_copy, no_xet):
    class RefusingHub(RecordingHub):
        def answer(self, handler, path, body):
            return handler._reply(403, {"error": "You don't have the rights to create a model under this namespace"})

    with RefusingHub() as hub:
        with pytest.raises(HubUploadError, match="write access"):
            push_to_hub(checkpoint_copy, REPO_ID, token="hf_test_token", endpoint=hub.endpoint)


def _one_error_line(stderr: str) -> str:
    """The last stderr line is the error; progress bars may come before it, a traceback must not."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    return errors[0]


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    tokenizer = make_tiny_tokenizer()
    base = tmp_path / "base"
    make_tiny_model("llama_gqa", vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


CLI_RECIPE = ["--num-samples", "8", "--sequence-length", "32", "--num-calibrated-layers", "1", "--refit-damping",
              "0.1", "--device", "cpu"]


def test_cli_push_without_token_fails_before_pruning(tiny_base, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from optimum_olica.commands import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(tiny_base), str(output), *CLI_RECIPE, "--push-to-hub", REPO_ID, "--private"])
    assert exit_.value.code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "No Hugging Face token" in line and "Nothing was pruned" in line
    assert not output.exists() or not any(output.iterdir())


def test_cli_push_without_network_exits_1_and_keeps_the_output(tiny_base, tmp_path, monkeypatch, capsys, no_xet):
    """The pruned output is written, the upload fails (nothing listens at the endpoint), the output stays."""
    import socket

    import huggingface_hub.constants

    from optimum_olica.commands import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)  # what HF_ENDPOINT sets at import
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(tiny_base), str(output), *CLI_RECIPE, "--push-to-hub", REPO_ID])
    assert exit_.value.code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "ConnectError" in line and "intact" in line
    from transformers import AutoModelForCausalLM

    report = json.loads((output / "olica_report.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(output).num_parameters() == report["parameters_after"]
