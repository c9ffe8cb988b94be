"""Which settings decide a job's rows (its fingerprint: a rerun with other ones is refused), and
values that must be refused when the spec is read rather than fail late."""

from __future__ import annotations

import pytest

from pipeline import CaptionJob, JobConfigError

BASE = {"input": {"path": "in"}, "output": {"path": "out"}}


def fingerprint(**sections) -> str:
    return CaptionJob.from_dict({**BASE, **sections}).fingerprint()


@pytest.mark.parametrize("unused", [{"seed": 7}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.9},
                                    {"length_penalty": 2.0}])
def test_settings_greedy_search_does_not_use_leave_the_fingerprint_alone(unused):
    assert fingerprint(generation=unused) == fingerprint()


@pytest.mark.parametrize("used", [{"seed": 7}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.9}])
def test_sampling_settings_count_when_sampling(used):
    sampling = {"do_sample": True}
    assert fingerprint(generation={**sampling, **used}) != fingerprint(generation=sampling) != fingerprint()


def test_the_length_penalty_counts_with_beams_and_the_dtype_as_written():
    beams = {"num_beams": 3}
    assert fingerprint(generation={**beams, "length_penalty": 2.0}) != fingerprint(generation=beams)
    assert fingerprint(model={"dtype": "float16"}) != fingerprint(model={"dtype": "bfloat16"}) != fingerprint()


def test_images_per_shard_counts_only_where_it_groups_image_files():
    assert fingerprint(input={"path": "in", "images_per_shard": 10}) == fingerprint()
    images = {"path": "in", "format": "images"}
    assert fingerprint(input={**images, "images_per_shard": 10}) != fingerprint(input=images)


@pytest.mark.parametrize(
    ("sections", "field"),
    [({"generation": {"temperature": float("nan")}}, "generation.temperature"),
     ({"generation": {"length_penalty": float("inf")}}, "generation.length_penalty"),
     ({"output": {"path": "out", "quality": {"min_score": float("nan")}}}, "output.quality.min_score"),
     ({"output": {"path": "out", "quality": {"min_score": 0.5}}}, "output.quality.min_score"),
     ({"compute": {"gpus_per_worker": float("nan")}}, "compute.gpus_per_worker"),
     ({"input": {"path": "in", 1: "y", "foo": "z"}}, "input.1")],
)
def test_values_that_cannot_work_are_refused_naming_the_field(sections, field):
    with pytest.raises(JobConfigError) as info:
        CaptionJob.from_dict({**BASE, **sections})
    assert info.value.field == field
