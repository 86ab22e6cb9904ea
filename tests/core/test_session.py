"""The session folder: immediate saves, rounds, rollback, resume, fingerprint check."""

import numpy as np
import pytest

from napari_uga.audit import PatchScore
from napari_uga.io import InputError, read_mask
from napari_uga.selection import Box, Proposal
from napari_uga.session import Session, audit_pairs


def test_session_survives_reopen_and_rolls_back(tmp_path, tiny_model_path, tiny_model, umcu_pairs):
    session = Session.create(tmp_path / "s", tiny_model_path, {"samples": 4})
    session.add_image("tile", array=umcu_pairs[0].image)
    mask = umcu_pairs[0].mask[:128, :128]
    ids = session.add_annotations([Box("tile", 0, 0, 128, 128)], [mask])
    assert np.array_equal(read_mask(tmp_path / "s" / "labels" / "00001.png"), mask)  # on disk at once
    session.set_queue([Proposal("tile", 128, 128, 128, 128, score=0.5, rank=1)])
    session.queue_position = 0

    reopened = Session.open(tmp_path / "s")
    assert reopened.pending_ids() == ids
    assert reopened.load_annotations()[0].image.shape == (128, 128, 3)
    assert reopened.queue_proposals()[0].score == 0.5

    reopened.record_round(tiny_model, ids, loss=0.3, settings={"shift": "centre", "lr": 1e-4})
    assert (tmp_path / "s" / "checkpoints" / "round_001.safetensors").is_file()
    again = Session.open(tmp_path / "s")
    assert again.current_round == 1 and again.pending_ids() == []
    assert again.rounds[1].settings == {"shift": "centre", "lr": 1e-4}
    again.load_model(1)

    again.rollback()
    assert again.current_round == 0 and again.pending_ids() == ids
    again.record_round(tiny_model, ids)  # replaces the undone round
    assert len(Session.open(tmp_path / "s").rounds) == 2


def test_audits_are_held_out_of_training_and_one_a_round_trained_on_never_counts_as_held_out(
    tmp_path, tiny_model_path, tiny_model, umcu_pairs
):
    session = Session.create(tmp_path / "s", tiny_model_path, {"samples": 4})
    session.add_image("tile", array=umcu_pairs[0].image, mpp=0.24)
    boxes = [Box("tile", 0, 0, 128, 128), Box("tile", 128, 0, 64, 64), Box("tile", 128, 64, 64, 64)]
    session.add_annotations(boxes, [np.zeros((b.h, b.w), np.uint8) for b in boxes], audits=[False, True, True])
    assert session.pending_ids() == [1] and session.held_out_ids() == [2, 3] and session.training_ids() == [1]
    session.record_round(tiny_model, [1, 3])  # as a session before stop 32 did: it trained on audit 3
    assert session.pending_ids() == [] and session.held_out_ids() == [2] and session.training_ids() == [1, 3]
    session.rollback()  # audit 3 is free of any round again, but a round did train on it
    reopened = Session.open(tmp_path / "s")
    assert reopened.pending_ids() == [1, 3] and reopened.held_out_ids() == [2]
    reopened.close()
    pairs, mpp = audit_pairs(tmp_path / "s")  # QC calibrates only on audits no round trained on
    assert [p.image.shape[:2] for p in pairs] == [(64, 64)] and pairs[0].name == "tile@y128x0" and mpp == 0.24


def test_scores_are_kept_with_the_predictor_they_were_made_under(tmp_path, tiny_model_path, tiny_model, umcu_pairs):
    session = Session.create(tmp_path / "s", tiny_model_path)
    session.add_image("tile", array=umcu_pairs[0].image)
    boxes = [Box("tile", 0, 0, 64, 64), Box("tile", 64, 0, 64, 64)]
    ids = session.add_annotations(boxes, [np.zeros((64, 64), np.uint8)] * 2, audits=[True, True])
    plain, flipped = PatchScore(1, 2, 3, 0.25), PatchScore(2, 2, 3, 0.0)
    session.record_scores({ids[0]: {0: plain}}, "plain")
    session.record_scores({ids[0]: {1: flipped}, ids[1]: {0: flipped}}, "soup+flips")
    reopened = Session.open(tmp_path / "s")
    assert reopened.known_scores(ids, "plain") == [{0: plain}, {}]
    assert reopened.known_scores(ids, "soup+flips") == [{1: flipped}, {0: flipped}]
    assert reopened.scores_of(0) == [plain, flipped]  # every score still counts in the estimate
    reopened.record_round(tiny_model, [])
    reopened.rollback()  # round 1 is undone: its scores were of a model the session no longer uses
    assert reopened.known_scores(ids, "soup+flips") == [{}, {0: flipped}]


def test_changed_image_is_refused(tmp_path, tiny_model_path, umcu_pairs):
    session = Session.create(tmp_path / "s", tiny_model_path)
    path = session.add_image("tile", array=umcu_pairs[0].image)
    path.write_bytes(path.read_bytes() + b"changed")
    with pytest.raises(InputError, match="changed since the session was saved"):
        Session.open(tmp_path / "s")


def test_create_refuses_existing_session_and_open_refuses_non_session(tmp_path, tiny_model_path):
    Session.create(tmp_path / "s", tiny_model_path)
    with pytest.raises(InputError, match="already holds a session"):
        Session.create(tmp_path / "s", tiny_model_path)
    with pytest.raises(InputError, match="no session.json"):
        Session.open(tmp_path)


def test_annotation_shape_must_match_its_box(tmp_path, tiny_model_path):
    session = Session.create(tmp_path / "s", tiny_model_path)
    with pytest.raises(InputError, match="does not match"):
        session.add_annotations([Box("x", 0, 0, 64, 64)], [np.zeros((32, 32), np.uint8)])


def test_incomplete_or_newer_record_opens_or_fails_in_one_line(tmp_path, tiny_model_path):
    import json

    Session.create(tmp_path / "s", tiny_model_path)
    record = tmp_path / "s" / "session.json"
    data = json.loads(record.read_text())
    data["rounds"][0]["from_a_newer_version"] = 1  # unknown round keys are ignored
    record.write_text(json.dumps(data))
    assert Session.open(tmp_path / "s").rounds[0].index == 0
    for broken in ({**data, "queue": None}, {**data, "images": []}, {**data, "images": {"x": {"mpp": 1}}}):
        record.write_text(json.dumps(broken))
        with pytest.raises(InputError, match="incomplete session record"):
            Session.open(tmp_path / "s")
    record.write_text("[]")
    with pytest.raises(InputError, match="not a session record"):
        Session.open(tmp_path / "s")
    record.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not valid JSON"):
        Session.open(tmp_path / "s")
