"""Chat and preference data over real gRPC, Kafka and S3: the generative-labeling issue's "done when".

Import an OpenAI-messages file and an Alpaca file into a chat project and a DPO file into a preference
project → two annotators answer through NextTask/SubmitAnnotation (edit, rate, flag; choose, rank, tie) →
agreement (ordinal alpha of ratings, pair agreement of rankings) → a reviewer resolves a conflict → publish →
the files in S3 load with ``datasets.load_dataset("json", ...)`` in the shapes TRL's SFT and DPO trainers
read (TRL's own chat-template helpers render them).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from datasets import load_dataset
from transformers import AutoTokenizer
from trl.data_utils import apply_chat_template, is_conversational

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.core.host import ServiceHost
from gristmill.core.manifests import DatasetManifest
from gristmill.core.settings import S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from tests.support.tiny_model import minilm_path

pytestmark = pytest.mark.integration

# ChatML, as SmolLM2-Instruct's GGUF carries it: the test renders rows the way a trainer would.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QUESTIONS = [
    ("Where is my order 1234?", "It ships tomorrow."),
    ("Can I return shoes after 30 days?", "Returns are accepted within 60 days."),
    ("Write to me at jane.doe@example.com about the refund.", "We will email you today."),
    ("Does the blender come with a warranty?", "Yes, two years."),
    ("How do I reset my password?", "Use the 'forgot password' link."),
    ("Is the jacket waterproof?", "It is water resistant, not waterproof."),
]
ALPACA = [
    {"instruction": "Summarise the review.", "input": "Great phone, battery lasts two days.", "output": "Positive."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]
DPO = [
    {"prompt": "Greet the customer.", "chosen": "Hello! How can I help?", "rejected": "What?"},
    {"prompt": "Apologise for a delay.", "chosen": "Sorry for the wait.", "rejected": "Not our fault."},
    {"prompt": "Thank the customer.", "chosen": "Thank you for shopping with us!", "rejected": "Ok."},
    {"prompt": "Offer help.", "chosen": "Anything else I can do?", "rejected": "Bye."},
]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


async def _import(stub: pb_grpc.LabelingServiceStub, project_id: str, data: bytes, name: str) -> pb.ImportReport:
    async def messages() -> Any:
        yield pb.ImportItemsRequest(
            options=pb.ImportOptions(
                project_id=project_id, format=pb.IMPORT_FORMAT_JSONL, source_name=name, request_id=f"{name}-1"
            )
        )
        for start in range(0, len(data), 97):  # chunks that cut lines
            yield pb.ImportItemsRequest(chunk=data[start : start + 97])

    report: pb.ImportReport = await stub.ImportItems(messages())
    return report


async def _label_all(stub: pb_grpc.LabelingServiceStub, project_id: str, annotator: str, answer: Any) -> int:
    done = 0
    while True:
        reply = await stub.NextTask(pb.NextTaskRequest(project_id=project_id, annotator_id=annotator))
        if not reply.HasField("task"):
            return done
        item = reply.task.item
        assert item.WhichOneof("content") == "conversation"
        await stub.SubmitAnnotation(
            pb.SubmitAnnotationRequest(
                project_id=project_id,
                item_id=item.item_id,
                annotator_id=annotator,
                task_id=reply.task.task_id,
                response=answer(item),
            )
        )
        done += 1


async def _publish(stub: pb_grpc.LabelingServiceStub, project_id: str) -> pb.DatasetVersion:
    reply = await stub.PublishDatasetVersion(
        pb.PublishDatasetVersionRequest(
            project_id=project_id, ratios=pb.SplitRatios(train=0.5, validation=0.25, test=0.25), seed=7
        )
    )
    return reply.dataset_version


def _download(s3: S3Settings, version: pb.DatasetVersion, into: Path) -> tuple[DatasetManifest, list[Path]]:
    objects = S3ObjectStore(s3)
    manifest = DatasetManifest.from_json(
        objects.get_bytes(version.manifest.key, expected_sha256=version.manifest.sha256)
    )
    files = []
    for summary in version.splits:
        if not summary.item_count:
            continue
        path = into / Path(summary.file.key).name
        path.write_bytes(objects.get_bytes(summary.file.key, expected_sha256=summary.file.sha256))
        files.append(path)
    return manifest, files


async def test_chat_and_preference_data_from_import_to_trl_shaped_versions(
    host: ServiceHost, s3: S3Settings, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    chat_id, pref_id = f"it-chat-{suffix}", f"it-pref-{suffix}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.server.port}") as channel:
        stub = pb_grpc.LabelingServiceStub(channel)
        settings = pb.ProjectSettings(annotations_per_item=2)
        for project_id, task in ((chat_id, common_pb2.TASK_TYPE_CHAT), (pref_id, common_pb2.TASK_TYPE_PREFERENCE)):
            await stub.CreateProject(
                pb.CreateProjectRequest(
                    project_id=project_id, display_name=project_id, task_type=task, settings=settings
                )
            )

        # -- import: OpenAI messages (one a repeat of another) and Alpaca into chat, DPO into preference
        openai_rows = [
            {
                "id": f"oa-{i}",
                "messages": [
                    {"role": "system", "content": "You are a support assistant."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ],
            }
            for i, (q, a) in enumerate(QUESTIONS)
        ]
        openai_rows.append({**openai_rows[0], "id": "oa-repeat"})
        report = await _import(stub, chat_id, _jsonl(openai_rows), "openai")
        assert (report.accepted_count, report.dropped_exact_duplicate_count) == (len(QUESTIONS), 1)
        assert dict(report.records_by_format) == {"openai": len(QUESTIONS) + 1}
        assert report.pii_masked_by_kind["EMAIL"] == 1
        report = await _import(stub, chat_id, _jsonl(ALPACA), "alpaca")
        assert report.accepted_count == 2 and dict(report.records_by_format) == {"alpaca": 2}
        report = await _import(stub, pref_id, _jsonl(DPO), "dpo")
        assert report.accepted_count == 4 and dict(report.records_by_format) == {"dpo": 4}
        # A DPO record's chosen-over-rejected is recorded as the import annotator's ranking.
        assert report.imported_label_count == 4

        items = (await stub.ListItems(pb.ListItemsRequest(project_id=chat_id))).items
        masked = next(i for i in items if i.external_id == "oa-2")
        assert "jane.doe@example.com" not in masked.conversation.messages[1].content
        assert "[EMAIL]" in masked.conversation.messages[1].content

        # -- bad input: nothing stored, the line and the field named
        bad = _jsonl([{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _import(stub, chat_id, bad, "bad")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "line 1" in (caught.value.details() or "")
        same = _jsonl([{"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _import(stub, pref_id, same, "same")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        project = await stub.GetProject(pb.GetProjectRequest(project_id=chat_id))
        assert project.stats.item_count == len(QUESTIONS) + 2

        # -- two annotators on the chat project: A keeps and rates high; B edits some, flags one
        def annotator_a(item: pb.Item) -> pb.Response:
            return pb.Response(rating=5 if "password" not in item.conversation.messages[-1].content else 4)

        def annotator_b(item: pb.Item) -> pb.Response:
            last = item.conversation.messages[-1].content
            if "ships tomorrow" in last:
                return pb.Response(flags=["wrong"], rating=1)
            if "60 days" in last:
                return pb.Response(reply="You can return shoes within 60 days of delivery.", rating=4)
            return pb.Response(rating=4)

        assert await _label_all(stub, chat_id, "ann-a", annotator_a) == len(QUESTIONS) + 2
        assert await _label_all(stub, chat_id, "ann-b", annotator_b) == len(QUESTIONS) + 2
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitAnnotation(
                pb.SubmitAnnotationRequest(
                    project_id=chat_id, item_id=items[1].item_id, annotator_id="ann-c", response=pb.Response(rating=9)
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rating" in (caught.value.details() or "")

        agreement = await stub.GetAgreement(pb.GetAgreementRequest(project_id=chat_id))
        assert agreement.HasField("rating_krippendorff_alpha") and agreement.rated_item_count == len(QUESTIONS) + 2
        assert agreement.conflict_item_count == 1  # "ships tomorrow": accepted by A, rejected by B
        conflicts = (
            await stub.ListItems(pb.ListItemsRequest(project_id=chat_id, statuses=[pb.ITEM_STATUS_CONFLICT]))
        ).items
        [conflict] = conflicts
        resolved = await stub.ResolveItem(
            pb.ResolveItemRequest(
                project_id=chat_id,
                item_id=conflict.item_id,
                reviewer_id="lead",
                response=pb.Response(reply="Your order ships tomorrow; you will get a tracking email.", rating=5),
            )
        )
        assert resolved.status == pb.ITEM_STATUS_RESOLVED and resolved.consensus.labels == ["accepted"]

        # -- preference: the import counted as one annotation; one annotator agrees mostly, ties one
        def chooser(item: pb.Item) -> pb.Response:
            candidates = list(item.conversation.candidates)
            if any(c == "Bye." for c in candidates):
                return pb.Response(tie=True)
            best = max(range(len(candidates)), key=lambda i: len(candidates[i]))
            return pb.Response(ranking=[best])

        assert await _label_all(stub, pref_id, "ann-a", chooser) == 4
        pref_agreement = await stub.GetAgreement(pb.GetAgreementRequest(project_id=pref_id))
        assert pref_agreement.ranked_item_count == 4
        assert pref_agreement.ranking_pair_agreement == pytest.approx(3 / 4)
        tied = (await stub.ListItems(pb.ListItemsRequest(project_id=pref_id, statuses=[pb.ITEM_STATUS_CONFLICT]))).items
        assert len(tied) == 1

        # -- publish both and read them as TRL's trainers would
        chat_version = await _publish(stub, chat_id)
        pref_version = await _publish(stub, pref_id)

    assert chat_version.row_format == "sft-messages" and pref_version.row_format == "dpo-conversational"
    (tmp_path / "chat").mkdir()
    (tmp_path / "pref").mkdir()
    manifest, files = _download(s3, chat_version, tmp_path / "chat")
    assert manifest.row_format == "sft-messages"
    sft = load_dataset("json", data_files=[str(f) for f in files], split="train")
    # 8 conversations: every one accepted by both or resolved, so every one publishes one row.
    assert sft.num_rows == len(QUESTIONS) + 2
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template = CHATML
    replies = {}
    for row in sft:
        assert is_conversational(row)
        text = apply_chat_template({"messages": row["messages"]}, tokenizer)["text"]
        assert text.startswith("<|im_start|>")
        replies[row["messages"][-2]["content"]] = row["messages"][-1]["content"]
    # A kept the reply, B edited it: one vote each, and an edit wins a tie.
    assert replies["Can I return shoes after 30 days?"] == "You can return shoes within 60 days of delivery."
    assert replies["Where is my order 1234?"].startswith("Your order ships tomorrow")  # the reviewer's reply

    manifest, files = _download(s3, pref_version, tmp_path / "pref")
    assert manifest.row_format == "dpo-conversational"
    dpo = load_dataset("json", data_files=[str(f) for f in files], split="train")
    # 4 items: 3 decided (the import and ann-a agree), 1 tied (not published); two candidates -> one pair each.
    assert dpo.num_rows == 3
    for row in dpo:
        assert is_conversational(row)
        rendered = apply_chat_template(
            {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}, tokenizer
        )
        assert rendered["prompt"].endswith("<|im_start|>assistant\n")
        assert rendered["chosen"] != rendered["rejected"]
    chosen = {row["prompt"][0]["content"]: row["chosen"][0]["content"] for row in dpo}
    assert chosen["Greet the customer."] == "Hello! How can I help?"
