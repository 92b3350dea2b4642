"""library/sample_prompts.py: upstream's prompt-file syntax (.txt options, .json, .toml), defaults, and errors that
name the file, the line or entry and what was expected."""

import json
import re

import pytest

from library import sample_prompts as sp
from library.sample_prompts import SamplePrompt
from library.samplers import SAMPLER_NAMES


def fields(prompt: SamplePrompt) -> dict:
    return dict(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt, width=prompt.width,
                height=prompt.height, seed=prompt.seed, steps=prompt.steps, scale=prompt.scale, sampler=prompt.sampler)


DEFAULTS = dict(negative_prompt="", width=512, height=512, seed=None, steps=30, scale=7.5, sampler=None)


# ------------------------------------------------------------------------------------------------ one line

@pytest.mark.parametrize("line, expected", [
    ("a cat", dict(prompt="a cat")),
    # upstream's documented example
    ("masterpiece, best quality, 1girl, in white shirts --n low quality, worst quality, bad anatomy --w 768 --h 768 "
     "--d 1 --l 7.5 --s 28",
     dict(prompt="masterpiece, best quality, 1girl, in white shirts", negative_prompt="low quality, worst quality, "
          "bad anatomy", width=768, height=768, seed=1, scale=7.5, steps=28)),
    # any order; the negative prompt runs to the next option
    ("a dog --s 20 --ss euler_a --n blurry, dark --h 640 --w 1024 --l 5 --d 42",
     dict(prompt="a dog", negative_prompt="blurry, dark", width=1024, height=640, seed=42, scale=5.0, steps=20,
          sampler="euler_a")),
    # option letters and sampler names in any case; single dashes and '--' without a space before stay in the text
    ("a-b --W 640 --SS K_Euler_A --N x-y", dict(prompt="a-b", width=640, sampler="k_euler_a", negative_prompt="x-y")),
    ("a dog--w 640 --w 576", dict(prompt="a dog--w 640", width=576)),  # the last --w wins
    # steps clamped to 1..1000, sizes rounded down to a multiple of 8 and at least 64, as upstream
    ("a dog --s 0", dict(prompt="a dog", steps=1)),
    ("a dog --s 5000", dict(prompt="a dog", steps=1000)),
    ("a dog --w 100 --h 8", dict(prompt="a dog", width=96, height=64)),
    ("a dog --w 1030", dict(prompt="a dog", width=1024)),
    ("a dog --l 0", dict(prompt="a dog", scale=0.0)),
    ("a dog --n", dict(prompt="a dog")),  # an empty negative prompt
    ("  a dog   --n  ugly  ", dict(prompt="a dog", negative_prompt="ugly")),
    ("a dog --d 0", dict(prompt="a dog", seed=0)),
])
def test_a_line_gives_upstreams_fields_with_upstreams_defaults(line, expected):
    assert fields(sp.parse_prompt_line(line)) == {**DEFAULTS, **expected}


BAD_LINES = [
    ("a cat --w 7x7", r"--w: expected a non-negative integer, got '7x7'"),
    ("a cat --w -512", r"--w: expected a non-negative integer, got '-512'"),
    ("a cat --h 512.0", r"--h: expected a non-negative integer, got '512.0'"),
    ("a cat --d one", r"--d: expected a non-negative integer, got 'one'"),
    ("a cat --s many", r"--s: expected a non-negative integer, got 'many'"),
    ("a cat --l strong", r"--l: expected a number, got 'strong'"),
    ("a cat --l nan", r"--l: expected a non-negative number, got 'nan'"),
    ("a cat --w", r"--w needs a value"),
    ("a cat --x 3", r"unknown option --x; expected --n, --w, --h, --d, --s, --l, --ss"),
    ("a cat --dog", r"unknown option --dog"),
    ("a cat --ss euler_b", r"--ss: sampler 'euler_b': expected one of ddim, pndm, lms, euler, euler_a, heun, "),
    ("a cat --ss ddpm", r"--ss: sampler 'ddpm': expected one of"),  # upstream's get_my_scheduler knows it; the CLI not
    ("a cat --g 3.5", r"--g is the embedded guidance scale of FLUX.1; SDXL sample images do not use it"),
    ("a cat --cn control.png", r"--cn is a ControlNet image"),
    ("a cat --fs 3", r"--fs is the flow shift"),
    ("--n ugly --w 512", r"missing prompt text before the options"),
    ("a cat --w 520", r"--w: 520 is not a multiple of 32, which the SDXL UNet needs; try 512 or 544"),
    ("a cat --h 90", r"--h: 90 \(rounded down to 88\) is not a multiple of 32, which the SDXL UNet needs; try 64 or 96"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_line_fails_naming_the_file_the_line_and_what_was_expected(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# samples\n\nfirst prompt --w 768\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: line 4: {message}") as error:
        sp.load_sample_prompts(str(path))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ files

TXT = """# prompt 1
masterpiece, a girl --n low quality --w 768 --h 768 --d 1 --l 7.5 --s 28

   # an indented comment
# prompt 2
a boy in a suit --n (low quality), blurry --w 576 --h 832 --d 2 --l 5.5 --s 40 --ss euler_a
a plain prompt
"""

EXPECTED = [
    dict(DEFAULTS, prompt="masterpiece, a girl", negative_prompt="low quality", width=768, height=768, seed=1, steps=28),
    dict(DEFAULTS, prompt="a boy in a suit", negative_prompt="(low quality), blurry", width=576, height=832, seed=2,
         scale=5.5, steps=40, sampler="euler_a"),
    dict(DEFAULTS, prompt="a plain prompt"),
]

JSON_ITEMS = [
    "masterpiece, a girl --n low quality --w 768 --h 768 --d 1 --l 7.5 --s 28",
    {"prompt": "a boy in a suit", "negative_prompt": "(low quality), blurry", "width": 576, "height": 832, "seed": 2,
     "scale": 5.5, "sample_steps": 40, "sample_sampler": "euler_a"},
    {"prompt": "a plain prompt"},
]

TOML = """
[prompt]
width = 768
height = 768
sample_steps = 28
negative_prompt = "low quality"

  [[prompt.subset]]
  prompt = "masterpiece, a girl"
  seed = 1

  [[prompt.subset]]
  prompt = "a boy in a suit"
  negative_prompt = "(low quality), blurry"
  width = 576
  height = 832
  seed = 2
  scale = 5.5
  sample_steps = 40
  sample_sampler = "euler_a"

  [[prompt.subset]]
  prompt = "a plain prompt"
  negative_prompt = ""
  width = 512
  height = 512
  sample_steps = 30
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, text", [("p.txt", TXT), ("p.json", json.dumps(JSON_ITEMS)), ("p.toml", TOML)])
def test_the_three_forms_give_the_same_prompts_in_file_order(tmp_path, name, text):
    path = write(tmp_path, name, text)
    prompts = sp.load_sample_prompts(path)
    assert [fields(p) for p in prompts] == EXPECTED
    assert [p.index for p in prompts] == [0, 1, 2]  # upstream's "enum": comments and blank lines do not count
    where = {"p.txt": ["line 2", "line 6", "line 7"], "p.json": ["entry 1", "entry 2", "entry 3"],
             "p.toml": ["[[prompt.subset]] 1", "[[prompt.subset]] 2", "[[prompt.subset]] 3"]}[name]
    assert [p.source for p in prompts] == [f"{path}: {w}" for w in where]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffa cat --w 640\n".encode("utf-8"))
    assert sp.load_sample_prompts(str(path))[0].prompt == "a cat"


@pytest.mark.parametrize("items, where, message", [
    ([{"prompt": "a"}, {"prompt": "b", "width": "wide"}], "entry 2", r"'width': expected a non-negative integer"),
    ([{"prompt": "a", "steps": 20}], "entry 1", r"unknown key 'steps'; expected prompt, negative_prompt, width, height"),
    ([{"negative_prompt": "ugly"}], "entry 1", r"missing prompt text"),
    ([{"prompt": "   "}], "entry 1", r"missing prompt text"),
    ([{"prompt": "a", "width": 512.0}], "entry 1", r"'width': expected an integer, got 512.0"),
    ([{"prompt": "a", "seed": True}], "entry 1", r"'seed': expected an integer, got True"),
    ([{"prompt": "a", "scale": "high"}], "entry 1", r"'scale': expected a number, got 'high'"),
    ([{"prompt": "a", "sample_sampler": "plms"}], "entry 1", r"'sample_sampler': sampler 'plms': expected one of"),
    ([{"prompt": "a", "guidance_scale": 3.5}], "entry 1", r"'guidance_scale' \(--g\) is the embedded guidance scale"),
    ([{"prompt": 5}], "entry 1", r"'prompt': expected a string, got 5"),
    (["a", 7], "entry 2", r"expected a prompt string or a table/object of prompt keys, got 7"),
    (["a --w 7x7"], "entry 1", r"--w: expected a non-negative integer, got '7x7'"),
])
def test_a_bad_json_entry_fails_naming_the_entry(tmp_path, items, where, message):
    path = write(tmp_path, "p.json", json.dumps(items))
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: {where}: {message}"):
        sp.load_sample_prompts(path)


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a cat"}', r"expected a JSON list of prompts \(strings or objects\), got dict"),
    ('["a cat",', r"not valid JSON"),
    ("[]", r"contains no prompts"),
])
def test_a_bad_json_file_fails_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, "p.json", text)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: {message}"):
        sp.load_sample_prompts(path)


@pytest.mark.parametrize("text, message", [
    ('[[prompt]]\nprompt = "a cat"\n', r"expected a \[prompt\] table \(defaults\) with \[\[prompt.subset\]\] entries"),
    ('[prompt]\nwidth = 512\n', r"expected a \[prompt\] table"),
    ('[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nheight = "x"\n',
     r"\[\[prompt.subset\]\] 2: 'height': expected a non-negative integer, got 'x'"),
    ('[prompt]\nwidth = 520\n[[prompt.subset]]\nprompt = "a"\n',
     r"\[\[prompt.subset\]\] 1: 'width': 520 is not a multiple of 32"),
    ('[prompt]\nsteps = 20\n[[prompt.subset]]\nprompt = "a"\n', r"\[\[prompt.subset\]\] 1: unknown key 'steps'"),
    ('[prompt\n', r"not valid TOML"),
])
def test_a_bad_toml_file_fails_naming_the_subset(tmp_path, text, message):
    path = write(tmp_path, "p.toml", text)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: {message}"):
        sp.load_sample_prompts(path)


# ------------------------------------------------------------------------------------------------ the trainer's check

def test_check_before_training_returns_the_prompts_or_nothing_without_a_file(tmp_path):
    assert sp.check_sample_prompts(None) == []
    path = write(tmp_path, "p.txt", TXT)
    assert [fields(p) for p in sp.check_sample_prompts(path, "dpm_2_a")] == EXPECTED


@pytest.mark.parametrize("name, text, default_sampler, error, message", [
    ("missing.txt", None, "ddim", FileNotFoundError, r"--sample_prompts: prompt file not found: {path}$"),
    ("p.yaml", "a cat", "ddim", ValueError, r"--sample_prompts: {path}: a prompt file must end in .txt, .toml or .json"),
    ("p.txt", "# only a comment\n\n", "ddim", ValueError, r"--sample_prompts: {path}: contains no prompts"),
    ("p.txt", "a cat --s 3\n", "pndm", ValueError,
     r"--sample_prompts: {path}: line 1: sampler pndm needs at least 4 steps, got 3"),
    ("p.txt", "a cat --s 3 --ss pndm\n", "ddim", ValueError, r"line 1: sampler pndm needs at least 4 steps, got 3"),
    ("p.txt", "a cat --w 7x7\n", "ddim", ValueError, r"--sample_prompts: {path}: line 1: --w: expected"),
    ("p.txt", "a cat\n", "plms", ValueError, r"--sample_sampler 'plms': expected one of"),
])
def test_check_before_training_fails_with_the_option_file_and_line(tmp_path, name, text, default_sampler, error,
                                                                   message):
    path = str(tmp_path / name)
    if text is not None:
        write(tmp_path, name, text)
    with pytest.raises(error, match=message.format(path=re.escape(path))):
        sp.check_sample_prompts(path, default_sampler)


def test_every_sampler_name_is_accepted_in_a_prompt():
    for name in SAMPLER_NAMES:
        assert sp.parse_prompt_line(f"a cat --ss {name}").sampler == name
