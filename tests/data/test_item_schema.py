"""Items with several images or a video: construction, the placeholder grammar, content keys."""

import pytest
from PIL import Image

from embedkit.data.schema import Item, content_key, segments
from embedkit.data.video import frames_from_images


def _img(colour, size=(8, 6)):
    return Image.new("RGB", size, colour)


def _video(colours, stamps=None):
    return frames_from_images([_img(c) for c in colours], stamps)


def test_one_image_is_the_old_item():
    a, b = Item("x", _img("red")), Item("x", images=[_img("red")])
    assert a == b and a.image is a.images[0] and content_key(a) == content_key(b)
    assert Item("x").image is None


@pytest.mark.parametrize("kwargs, words", [
    (dict(image=_img("red"), images=[_img("red")]), "not both"),
    (dict(images=[_img("red")], video=_video(["red"])), "images or a video"),
    (dict(), "needs text"),
])
def test_refused_items(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Item(**kwargs)


def test_image_property_refuses_several_visuals():
    with pytest.raises(ValueError, match="2 images"):
        _ = Item("x", images=[_img("red"), _img("blue")]).image
    with pytest.raises(ValueError, match="video of 2 frames"):
        _ = Item("x", video=_video(["red", "blue"])).image


def test_segments_lead_without_placeholders_and_follow_them():
    two = [_img("red"), _img("blue")]
    assert segments(Item("hi", images=two)) == [("image", 0), ("image", 1), ("text", "hi")]
    assert segments(Item("a <|image_2|> b <|image_1|>", images=two)) == [
        ("text", "a "), ("image", 1), ("text", " b "), ("image", 0)]
    assert segments(Item("<|video_1|> what moves?", video=_video(["red"]))) == [("video", 0), ("text", " what moves?")]
    assert segments(Item(video=_video(["red"]))) == [("video", 0)]
    assert segments(Item("plain <|image_1|>")) == [("text", "plain <|image_1|>")]


@pytest.mark.parametrize("text, words", [
    ("<|image_1|> and <|image_3|>", "image_3"),
    ("<|image_1|> only", "not <|image_2|>"),
    ("<|image_1|><|image_1|><|image_2|>", "twice"),
    ("<|video_1|>", "video_1"),
])
def test_segments_refuse_mismatched_placeholders(text, words):
    with pytest.raises(ValueError, match=words.replace("|", r"\|")):
        segments(Item(text, images=[_img("red"), _img("blue")]))


def test_content_key_covers_every_image_frame_and_timestamp():
    base = Item("x", images=[_img("red"), _img("blue")])
    assert content_key(base) == content_key(Item("x", images=[_img("red"), _img("blue")]))
    assert content_key(base) != content_key(Item("x", images=[_img("blue"), _img("red")]))
    assert content_key(base) != content_key(Item("x", images=[_img("red"), _img("green")]))
    v = Item("x", video=_video(["red", "blue"], [0.0, 0.5]))
    assert content_key(v) == content_key(Item("x", video=_video(["red", "blue"], [0.0, 0.5])))
    assert content_key(v) != content_key(Item("x", video=_video(["red", "green"], [0.0, 0.5])))
    assert content_key(v) != content_key(Item("x", video=_video(["red", "blue"], [0.0, 1.0])))
    assert content_key(v) != content_key(base)
