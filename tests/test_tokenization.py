import numpy as np
import pytest

from aladin.backbone import load_tokenizer, write_initial_checkpoint
from aladin.config import BackboneConfig
from aladin.tokenization import encode_captions, encode_images

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "star", "large"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bb") / "backbone"
    write_initial_checkpoint(folder, WORDS, BackboneConfig(hidden_size=16, num_attention_heads=2), 10, seed=0)
    return load_tokenizer(folder)


def ids(tok, words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_vocabulary_keeps_berts_special_ids(tokenizer):
    # [UNK] must keep id 100 so quirk Q1 (an [UNK] first image token) means what it means in VinVL.
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 100, 101, 102)
    assert tokenizer.tokenize("A Red circle LEFT of a blue square.") == ["a", "red", "circle", "left", "of", "a", "blue", "square", "."]


def test_text_branch_layout(tokenizer):
    out = encode_captions(tokenizer, ["a red circle.", "a blue square left of a large star"], max_seq_length=8)
    assert out.input_ids[0].tolist() == [101, *ids(tokenizer, ["a", "red", "circle", "."]), 102, 0, 0]
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert out.lengths.tolist() == [6, 8]
    # Too long: cut to max_seq_length - 2 wordpieces, then [SEP].
    assert out.input_ids[1].tolist() == [101, *ids(tokenizer, ["a", "blue", "square", "left", "of", "a"]), 102]


@pytest.mark.parametrize("first_token, tok0", [("unk", 100), ("cls", 101)])
def test_image_branch_layout(tokenizer, first_token, tok0):
    feats = [np.arange(3 * 4, dtype=np.float32).reshape(3, 4), np.ones((1, 4), np.float32)]
    out = encode_images(tokenizer, [["circle", "star"], ["square"]], feats, max_seq_length=6,
                        max_img_seq_length=2, first_token=first_token)
    assert out.input_ids[0].tolist() == [tok0, *ids(tokenizer, ["circle", "star"]), 102, 0, 0]
    assert out.token_type_ids[0].tolist() == [0, 1, 1, 1, 0, 0]  # tags and their [SEP] are segment B
    # tags attend [1]*4 + pad [0]*2, then the first 2 of 3 regions
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    assert out.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 1, 0]
    assert out.lengths.tolist() == [2, 1]
    np.testing.assert_array_equal(out.img_feats[0].numpy(), feats[0][:2])  # first rows as stored
    np.testing.assert_array_equal(out.img_feats[1].numpy(), [[1, 1, 1, 1], [0, 0, 0, 0]])  # zero-padded
