"""GIT preprocessing and tokenization match transformers (the PIL backend) exactly."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gitmodel.image_processing import GitImageProcessor
from gitmodel.processing import GitProcessor
from gitmodel.tokenization import GitTokenizer
from tests.tiny_processor import save_tiny_processor

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil  # noqa: E402

TEXTS = [
    "A man riding a HORSE on the street.",
    "Café naïve résumé, ÀÉÎ!",
    "what's 2+2=4?! (maybe) #1 @home 50% & more...",
    "xyzzy qwfp unknownword",
    "日本 characters and 中文",
    "  multiple   spaces\tand\nnewlines  ",
    "two dogs sitting next to a red car",
    "the [MASK] token and [SEP] inside text",
    "",
]


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_processor(tmp_path_factory.mktemp("tiny") / "processor", image_size=32)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_folder):
    return transformers.AutoTokenizer.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def tokenizer(tiny_folder) -> GitTokenizer:
    return GitTokenizer.from_pretrained(tiny_folder)


def _noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Noise on a gradient: every resampling weight shows in the output."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    noise = rng.integers(0, 60, (height, width, channels))
    return np.clip(gradient + noise, 0, 255).astype(np.uint8)


def _image(mode: str, width: int = 53, height: int = 37) -> Image.Image:
    rgb = Image.fromarray(_noise(width, height))
    if mode == "RGBA":  # half transparent, half opaque: exercises the white compositing
        alpha = np.zeros((height, width), np.uint8)
        alpha[:, width // 2 :] = 255
        alpha[: height // 3] = 100
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(alpha))
        return rgba
    if mode == "LA":
        la = rgb.convert("L").convert("LA")
        la.putalpha(Image.fromarray(_noise(width, height, 1, seed=1)[..., 0]))
        return la
    if mode == "P":  # palette with a transparent index
        p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p.info["transparency"] = 3
        return p
    return rgb.convert(mode)


def _hf_pixels(hf_processor, images) -> torch.Tensor:
    return hf_processor(images, return_tensors="pt")["pixel_values"]


def _clip(**config) -> tuple[GitImageProcessor, CLIPImageProcessorPil]:
    config = {"image_processor_type": "CLIPImageProcessor", **config}
    return GitImageProcessor.from_dict(config), CLIPImageProcessorPil.from_dict(config)


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "width,height",
    [(53, 37), (37, 53), (640, 480), (480, 640), (7, 3), (1, 1), (32, 32), (33, 100), (301, 300)],
)
def test_pixel_values_equal_transformers_for_any_size(width, height):
    ours, hf = _clip(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = Image.fromarray(_noise(width, height))
    assert torch.equal(ours(image)["pixel_values"], _hf_pixels(hf, image))


def test_pixel_values_equal_transformers_at_git_base_resolution():
    ours, hf = _clip(size={"shortest_edge": 224}, crop_size=224)
    images = [Image.fromarray(_noise(640, 480, seed=3)), Image.fromarray(_noise(375, 500, seed=4))]
    assert torch.equal(ours(images)["pixel_values"], _hf_pixels(hf, images))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "LA", "I", "1"])
def test_pixel_values_equal_transformers_for_any_mode(mode):
    ours, hf = _clip(size={"shortest_edge": 32}, crop_size=32)
    image = _image(mode)
    assert torch.equal(ours(image)["pixel_values"], _hf_pixels(hf, image))


def test_transparency_is_composited_on_white():
    ours, _ = _clip(size={"shortest_edge": 8}, crop_size=8, do_normalize=False, do_rescale=False)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (ours.to_uint8(transparent) == 255).all()


@pytest.mark.parametrize(
    "config",
    [
        {"size": 32, "crop_size": 32, "resample": 3},  # legacy ints
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 24, "width": 36}, "resample": 2},
        {"size": {"shortest_edge": 32}, "crop_size": 32, "resample": 2, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]},  # early hub revisions: ImageNet statistics
        {"size": {"height": 20, "width": 30}, "do_center_crop": False},
        {"do_resize": False, "crop_size": {"height": 45, "width": 70}},  # crop larger than the image: zero padding
        {"size": 32, "crop_size": 32, "do_normalize": False},
        {"size": 32, "crop_size": 32, "do_rescale": False, "do_normalize": False},
        {"size": 32, "crop_size": 32, "resample": 1, "rescale_factor": 0.5 / 255},
        {"size": {"shortest_edge": 32, "longest_edge": 40}, "crop_size": 32},  # 53x37 is capped: 40x28
    ],
)
def test_config_variants_equal_transformers(config):
    ours, hf = _clip(**config)
    images = [_image("RGB"), _image("RGB", 40, 60)]
    if not ours.do_center_crop and "height" not in ours.size:
        images = images[:1]
    assert torch.equal(ours(images)["pixel_values"].float(), _hf_pixels(hf, images).float())


@pytest.mark.parametrize("longest_edge", [33, 40, 64])
def test_longest_edge_caps_the_resize_as_in_transformers(longest_edge):
    ours, hf = _clip(size={"shortest_edge": 32, "longest_edge": longest_edge}, do_center_crop=False)
    for width, height in [(53, 37), (37, 53), (32, 90), (90, 31), (41, 40), (200, 7), (32, 32), (20, 10)]:
        image = Image.fromarray(_noise(width, height))
        assert torch.equal(ours(image)["pixel_values"], _hf_pixels(hf, image)), (width, height)


def test_to_uint8_equals_transformers_resize_and_crop():
    ours, hf = _clip(size=32, crop_size=32, do_rescale=False, do_normalize=False)
    for image in [_image("RGB"), _image("RGBA", 90, 31), _image("P", 31, 90)]:
        expected = _hf_pixels(hf, image)[0]
        assert expected.dtype == torch.uint8
        assert np.array_equal(ours.to_uint8(image), expected.permute(1, 2, 0).numpy())


def test_numpy_inputs_equal_transformers():
    ours, hf = _clip(size=32, crop_size=32)
    rgb, rgba = _noise(50, 40), np.dstack([_noise(50, 40), _noise(50, 40, 1, seed=2)])
    for array in [rgb, rgba, rgb[..., :1]]:
        assert torch.equal(ours(array)["pixel_values"], _hf_pixels(hf, array))
    gray = rgb[..., 0]  # (H, W): transformers takes it as a PIL "L" image
    assert torch.equal(ours(gray)["pixel_values"], _hf_pixels(hf, Image.fromarray(gray, "L")))


def test_encoded_bytes_equal_transformers_on_the_decoded_image():
    from PIL import ImageOps

    ours, hf = _clip(size=32, crop_size=32)
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": must be applied, as transformers' load_image does
    Image.fromarray(_noise(60, 40)).save(jpeg, format="JPEG", quality=90, exif=exif)
    for data in [jpeg.getvalue(), _encode_png(_image("RGBA")), _encode_png(_image("P"))]:
        decoded = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert torch.equal(ours(data)["pixel_values"], _hf_pixels(hf, decoded))
    assert ours.to_uint8(jpeg.getvalue()).shape == (32, 32, 3)
    assert Image.open(io.BytesIO(jpeg.getvalue())).size == (60, 40)  # the rotation did happen: 40 wide


def test_videos_equal_transformers_videomae():
    config = {"image_processor_type": "VideoMAEImageProcessor", "size": 32, "crop_size": 32,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    ours, hf = GitImageProcessor.from_dict(config), VideoMAEImageProcessorPil.from_dict(config)
    assert ours.resample == Image.Resampling.BILINEAR
    videos = [[Image.fromarray(_noise(48, 36, seed=s + v)) for s in range(3)] for v in range(2)]
    pixel_values = ours.preprocess_videos(videos)["pixel_values"]
    assert pixel_values.shape == (2, 3, 3, 32, 32)
    assert torch.equal(pixel_values, hf(videos, return_tensors="pt")["pixel_values"])


def test_split_path_equals_call_in_any_dtype_and_from_any_container():
    ours, _ = _clip(size=32, crop_size=32)
    images = [_image("RGB"), _image("L", 70, 20), _image("RGBA", 20, 70)]
    expected = ours(images)["pixel_values"]
    crops = np.stack([ours.to_uint8(image) for image in images])
    assert crops.dtype == np.uint8 and crops.shape == (3, 32, 32, 3)
    assert torch.equal(ours.normalize(crops), expected)
    assert torch.equal(ours.normalize(torch.from_numpy(crops)), expected)
    assert torch.equal(ours.normalize(list(crops)), expected)
    assert torch.equal(ours.normalize(crops, dtype=torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(ours.normalize(crops, device="cpu", dtype=torch.float16), expected.half())
    video = ours.normalize(np.stack([crops, crops]))  # (B, F, H, W, 3) → (B, F, 3, H, W)
    assert video.shape == (2, 3, 3, 32, 32) and torch.equal(video[1], expected)
    with pytest.raises(TypeError):
        ours.normalize(crops.astype(np.float32))


def test_image_processor_round_trips_through_transformers(tmp_path):
    ours, _ = _clip(size=48, crop_size={"height": 40, "width": 44}, resample=2)
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    image = _image("RGB", 80, 61)
    assert torch.equal(ours(image)["pixel_values"], _hf_pixels(hf, image))
    assert GitImageProcessor.from_pretrained(tmp_path) == ours


# ---------------------------------------------------------------- tokenizer


def test_token_ids_equal_transformers(tokenizer, hf_tokenizer):
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id in tokenizer.encode(TEXTS[4])  # the texts do exercise [UNK]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == (0, 100, 101, 102, 103)
    assert tokenizer.vocab_size == hf_tokenizer.vocab_size
    assert tokenizer.model_max_length == hf_tokenizer.model_max_length


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batches_equal_transformers(tokenizer, hf_tokenizer, padding_side):
    ours = tokenizer(TEXTS, padding=True, padding_side=padding_side)
    theirs = hf_tokenizer(TEXTS, padding=True, padding_side=padding_side, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])

    ours = tokenizer(TEXTS, padding="max_length", padding_side=padding_side, truncation=True, max_length=9)
    theirs = hf_tokenizer(TEXTS, padding="max_length", padding_side=padding_side, truncation=True, max_length=9,
                          return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_unpadded_and_single_text_calls_equal_transformers(tokenizer, hf_tokenizer):
    ours = tokenizer(TEXTS[:3], padding=False, return_tensors=None)
    theirs = hf_tokenizer(TEXTS[:3], padding=False)
    assert ours["input_ids"] == theirs["input_ids"] and ours["attention_mask"] == theirs["attention_mask"]
    assert torch.equal(tokenizer(TEXTS[0])["input_ids"], hf_tokenizer(TEXTS[0], return_tensors="pt")["input_ids"])
    assert tokenizer(TEXTS[0], return_tensors=None)["input_ids"] == hf_tokenizer(TEXTS[0])["input_ids"]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decoding_equals_transformers(tokenizer, hf_tokenizer, skip_special_tokens):
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    expected = hf_tokenizer.batch_decode(batch, skip_special_tokens=skip_special_tokens)
    assert tokenizer.batch_decode(batch, skip_special_tokens=skip_special_tokens) == expected
    assert tokenizer.batch_decode(batch.tolist(), skip_special_tokens=skip_special_tokens) == expected
    for row in batch:
        assert tokenizer.decode(row, skip_special_tokens=skip_special_tokens) == hf_tokenizer.decode(
            row, skip_special_tokens=skip_special_tokens
        )
    assert tokenizer.decode(batch[0, 3]) == hf_tokenizer.decode(batch[0, 3])  # a 0-d tensor


def test_clean_up_tokenization_spaces_follows_the_config(tiny_folder, tmp_path):
    folder = tmp_path / "cleanup"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ours, theirs = GitTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    ids = theirs("a dog ' s car , isn ' t it ? yes !")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("tokenizer_config", [{}, {"do_lower_case": False}, {"strip_accents": False}])
def test_vocab_txt_only_folder_tokenizes_like_transformers(tiny_folder, tmp_path, tokenizer_config):
    folder = tmp_path / "vocab_only"
    shutil.copytree(tiny_folder, folder)
    os.remove(folder / "tokenizer.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer_config}))
    ours, theirs = GitTokenizer.from_pretrained(folder), transformers.BertTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    batch = theirs(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    assert ours.batch_decode(batch, skip_special_tokens=True) == theirs.batch_decode(batch, skip_special_tokens=True)
    if not tokenizer_config:  # the same vocabulary and options as tokenizer.json: the same tokenizer
        full = GitTokenizer.from_pretrained(tiny_folder)
        assert all(ours.encode(text) == full.encode(text) for text in TEXTS)


def test_tokenizer_config_options_override_tokenizer_json_as_in_transformers(tiny_folder, tmp_path):
    folder = tmp_path / "cased"
    shutil.copytree(tiny_folder, folder)  # tokenizer.json still lowercases
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    ours, theirs = GitTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.encode("The Dog") != GitTokenizer.from_pretrained(tiny_folder).encode("The Dog")
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text


def test_trained_wordpiece_tokenizer_loads_in_transformers(tmp_path):
    captions = ["a dog runs on the beach", "two cats sleeping on a red sofa", "a man rides a bicycle down the street",
                "children playing football in the park", "a plate of food on a wooden table"] * 20
    trained = GitTokenizer.train_wordpiece(captions, vocab_size=120)
    assert [trained.token_to_id(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]] == [0, 1, 2, 3, 4]
    trained.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= set(os.listdir(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["A dog sleeping on the sofa!", "Zebras playing", "the park"]
    assert trained(texts)["input_ids"].tolist() == theirs(texts, padding=True)["input_ids"]
    ids = trained(texts)["input_ids"]
    assert trained.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True)
    vocab_only = transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"))  # vocab.txt is consistent too
    assert [vocab_only.encode(t) for t in texts] == [trained.encode(t) for t in texts]


# ---------------------------------------------------------------- processor


def test_processor_outputs_equal_transformers_git_processor(tiny_folder):
    ours = GitProcessor.from_pretrained(tiny_folder)
    theirs = transformers.AutoProcessor.from_pretrained(tiny_folder)
    assert type(theirs.image_processor).__name__ == "CLIPImageProcessorPil"
    images = [_image("RGB"), _image("RGBA", 30, 70)]
    text = ["a dog on the street", "two men"]
    got, expected = ours(images=images, text=text), theirs(images=images, text=text, padding=True, return_tensors="pt")
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(got[key], expected[key]), key
    assert set(ours(images=images)) == {"pixel_values"}
    assert set(ours(text=text)) == {"input_ids", "attention_mask"}


def test_transformers5_nested_processor_config_loads_the_same(tiny_folder, tmp_path):
    nested = save_tiny_processor(tmp_path / "nested", image_size=32, layout="transformers5")
    assert not os.path.exists(os.path.join(nested, "preprocessor_config.json"))
    a, b = GitProcessor.from_pretrained(nested), GitProcessor.from_pretrained(tiny_folder)
    assert a.image_processor == b.image_processor
    image = _image("CMYK")
    assert torch.equal(a(images=image)["pixel_values"], b(images=image)["pixel_values"])


def test_saved_processor_loads_in_transformers_with_the_same_outputs(tiny_folder, tmp_path):
    GitProcessor.from_pretrained(tiny_folder).save_pretrained(tmp_path)
    reloaded = GitProcessor.from_pretrained(tmp_path)
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "GitProcessor"
    images, text = [_image("P"), _image("RGB", 99, 40)], TEXTS
    expected = theirs(images=images, text=text, padding=True, return_tensors="pt")
    got = reloaded(images=images, text=text)
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(got[key], expected[key]), key
    assert reloaded.batch_decode(got["input_ids"], skip_special_tokens=True) == theirs.batch_decode(
        expected["input_ids"], skip_special_tokens=True
    )


def test_videomae_processor_takes_images_as_the_frames_of_one_video_as_transformers_does(tmp_path):
    """transformers' docs caption a video with `processor(images=frames)`: one video, not a caption per frame."""
    folder = save_tiny_processor(tmp_path / "video", image_size=32, processor_type="videomae")
    ours, theirs = GitProcessor.from_pretrained(folder), transformers.GitProcessor.from_pretrained(folder)
    frames = [Image.fromarray(_noise(50, 40, seed=s)) for s in range(3)]
    arrays = np.stack([_noise(50, 40, seed=s) for s in range(3)])  # (F, H, W, 3)
    for images in (frames, frames[0], [frames, frames[::-1]], arrays, [arrays, arrays[::-1]], list(arrays)):
        expected = theirs(images=images, return_tensors="pt")["pixel_values"]
        assert expected.ndim == 5
        assert torch.equal(ours(images=images)["pixel_values"], expected)


def test_videomae_processor_folder_gives_video_pixel_values(tmp_path):
    folder = save_tiny_processor(tmp_path / "video", image_size=32, processor_type="videomae")
    ours, theirs = GitProcessor.from_pretrained(folder), transformers.AutoProcessor.from_pretrained(folder)
    videos = [[Image.fromarray(_noise(50, 40, seed=s)) for s in range(4)]]
    expected = theirs.image_processor(videos, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours(videos=videos)["pixel_values"], expected)


def test_loading_from_s3_equals_loading_locally(tiny_folder, s3_server):
    fs = s3_server.filesystem()
    # Created directly: s3fs's mkdir sends region us-east-1 as a LocationConstraint, which S3 rejects.
    s3_bucket = f"processor-{os.getpid()}-{id(fs):x}"
    fs.call_s3("create_bucket", Bucket=s3_bucket)
    for name in os.listdir(tiny_folder):
        fs.put_file(os.path.join(tiny_folder, name), f"{s3_bucket}/git/{name}")
    remote = GitProcessor.from_pretrained(f"s3://{s3_bucket}/git", storage_options=s3_server.storage_options)
    local = GitProcessor.from_pretrained(tiny_folder)
    assert remote.image_processor == local.image_processor
    got, expected = remote(images=_image("RGB"), text=TEXTS), local(images=_image("RGB"), text=TEXTS)
    assert all(torch.equal(got[key], expected[key]) for key in expected)

    # and saving to S3 writes a folder that loads back the same
    remote.save_pretrained(f"s3://{s3_bucket}/copy", storage_options=s3_server.storage_options)
    copy = GitProcessor.from_pretrained(f"s3://{s3_bucket}/copy", storage_options=s3_server.storage_options)
    assert torch.equal(copy(text=TEXTS)["input_ids"], expected["input_ids"])


def test_prompt_inputs_are_cls_plus_prompt_tokens_left_padded(tiny_folder, hf_tokenizer):
    processor = GitProcessor.from_pretrained(tiny_folder)
    input_ids, attention_mask = processor.prompt_inputs(None, batch_size=3)
    assert input_ids.tolist() == [[hf_tokenizer.cls_token_id]] * 3 and attention_mask.tolist() == [[1]] * 3

    prompts = ["what color is the car?", "how many dogs", "a"]
    input_ids, attention_mask = processor.prompt_inputs(prompts, batch_size=3)
    rows = [[hf_tokenizer.cls_token_id] + hf_tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    assert input_ids.tolist() == [[hf_tokenizer.pad_token_id] * (width - len(r)) + r for r in rows]
    assert attention_mask.tolist() == [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    assert hf_tokenizer.sep_token_id not in input_ids.tolist()[0]
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        processor.prompt_inputs(prompts[:2], batch_size=3)


def test_answers_decode_only_what_follows_the_prompt(tiny_folder, hf_tokenizer):
    processor = GitProcessor.from_pretrained(tiny_folder)
    prompt_ids, _ = processor.prompt_inputs(["what color is the car?", "how many dogs"], batch_size=2)
    answers = [hf_tokenizer.encode("red car", add_special_tokens=False) + [hf_tokenizer.sep_token_id],
               hf_tokenizer.encode("two", add_special_tokens=False) + [hf_tokenizer.sep_token_id, 0]]
    width = max(map(len, answers))
    generated = torch.cat([prompt_ids, torch.tensor([a + [0] * (width - len(a)) for a in answers])], dim=1)
    expected = hf_tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert processor.answers(generated, prompt_ids) == expected == ["red car", "two"]


# -------------------------------------------------------------------- errors


def test_missing_files_name_the_folder_and_the_file(tiny_folder, tmp_path):
    no_images = tmp_path / "no_images"
    shutil.copytree(tiny_folder, no_images)
    os.remove(no_images / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match=rf"{no_images}.*preprocessor_config.json"):
        GitProcessor.from_pretrained(no_images)

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_folder, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    os.remove(no_tokenizer / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=rf"{no_tokenizer}.*tokenizer.json.*vocab.txt"):
        GitProcessor.from_pretrained(no_tokenizer)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("preprocessor_config.json", "{not json", "preprocessor_config.json is not valid JSON"),
        ("preprocessor_config.json", "[1, 2]", "preprocessor_config.json: expected a JSON object"),
        ("preprocessor_config.json", '{"size": {"longest": 3}}', "preprocessor_config.json: unsupported size"),
        ("preprocessor_config.json", '{"image_processor_type": "SiglipImageProcessor"}', "unsupported image processor"),
        ("preprocessor_config.json", '{"image_mean": [0.5, 0.5]}', "image_mean must have 3 values"),
        ("tokenizer.json", "{broken", "tokenizer.json is not a valid tokenizers file"),
        ("tokenizer_config.json", "nope", "tokenizer_config.json is not valid JSON"),
        ("tokenizer_config.json", '{"cls_token": "[NOPE]"}', r"\[NOPE\].*not in the vocabulary"),
    ],
)
def test_corrupt_files_give_clear_errors(tiny_folder, tmp_path, name, content, message):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, folder)
    (folder / name).write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        GitProcessor.from_pretrained(folder)
    assert str(folder) in str(error.value)


def test_bad_inputs_give_clear_errors():
    ours, _ = _clip(size=32, crop_size=32)
    with pytest.raises(TypeError, match="unsupported image type"):
        ours("not an image")
    with pytest.raises(TypeError, match="uint8"):
        ours(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="same number of frames"):
        ours.preprocess_videos([[_image("RGB")], [_image("RGB"), _image("RGB")]])
