"""The A1111 `parameters` text this service writes, read back by an A1111 reader other than ours (sd-parsers) and by
our own reader (hdm_core.imagefile.parse_parameters, behind POST /v1/images/parameters)."""

from __future__ import annotations

from PIL import Image
from sd_parsers import ParserManager
from sd_parsers.data import Generators

from hdm_core import imagefile

REQ = {
    "prompt": "a red circle, on blue: masterpiece",
    "negative_prompt": "blurry, low quality",
    "steps": 24,
    "sampler": "euler",
    "guidance_scale": 5.5,
    "width": 64,
    "height": 48,
    "camera": {"x_shift": 0.25, "y_shift": -0.5, "zoom": 1.25},
    "tread_guidance": {"cond_rate": 0.5, "uncond_rate": 0.25},
}


def _png(tmp_path, **kw):
    text = imagefile.parameters_text(REQ, seed=1234, model_name="hdm-xut-340m", model_hash="ab" * 32, **kw)
    path = tmp_path / "a.png"
    imagefile.save(Image.new("RGB", (64, 48)), path, "png", text)
    return path


def test_sd_parsers_reads_every_field_back(tmp_path):
    info = ParserManager().parse(Image.open(_png(tmp_path)))
    assert info is not None and info.generator == Generators.AUTOMATIC1111
    assert info.full_prompt == REQ["prompt"]
    assert info.full_negative_prompt == REQ["negative_prompt"]
    (sampler,) = info.samplers
    assert sampler.name == "Euler"  # A1111's name of the sampler (hdm_core.config.SAMPLER_INFO)
    assert sampler.parameters == {"steps": "24", "cfg_scale": "5.5", "seed": "1234"}
    assert sampler.model is not None and sampler.model.name == "hdm-xut-340m"
    assert sampler.model.hash == "ababababab"
    assert info.metadata["Size"] == "64x48"
    assert info.metadata["Camera"] == "x_shift 0.25 y_shift -0.5 zoom 1.25"
    assert info.metadata["TREAD guidance"] == "cond 0.5 uncond 0.25"


def test_values_are_quoted_as_a1111_quotes_them_and_read_back(tmp_path):
    text = imagefile.parameters_text(
        REQ, seed=1, model_name="hdm, v2", model_hash=None, adapters=[("style", 0.8, "cd" * 32)]
    )
    assert 'Model: "hdm, v2"' in text and 'Lora hashes: "style: cdcdcdcdcd"' in text
    prompt, negative, fields = imagefile.parse_parameters(text)
    assert imagefile.lora_tags(prompt) == (REQ["prompt"], [("style", 0.8)])
    assert negative == REQ["negative_prompt"]
    assert fields["Model"] == "hdm, v2" and fields["Lora hashes"] == "style: cdcdcdcdcd"
    assert imagefile.named_numbers(fields["Camera"]) == REQ["camera"]
    assert imagefile.named_numbers(fields["TREAD guidance"]) == {"cond": 0.5, "uncond": 0.25}


def test_the_tuned_schedules_times_are_written_and_read_back_by_both_readers(tmp_path):
    times = (1.0, 0.9368, 0.8318, 0.625, 0.0670, 0.0)
    assert imagefile.schedule_fields("karras", times) == ()  # a formula of the steps: nothing to record
    fields = imagefile.schedule_fields("tuned", times)
    path = _png(tmp_path, extra=fields)
    info = ParserManager().parse(Image.open(path))
    assert info is not None and info.metadata["Schedule times"] == "1 0.9368 0.8318 0.625 0.067 0"
    _, _, ours = imagefile.parse_parameters(Image.open(path).info["parameters"])
    assert [float(t) for t in ours["Schedule times"].split()] == list(times)
    assert ours["Seed"] == "1234" and ours["Version"] == "hdm-serve"
