"""The bilingual model's sets, judges and routing: English and Russian, judged by script."""
from __future__ import annotations

import json

import pytest

from clitools import assert_one_line_error, cli
from steer_gguf.detect.datasets import load_pairs
from steer_gguf.evaluation.evalsets import load_eval_set, normalize
from steer_gguf.evaluation.judges import UNCLASSIFIED, behavior, judge_drift, judge_language
from steer_gguf.front.demo import BILINGUAL_MODEL


def test_language_judge_labels_by_script_and_reports_mixed():
    assert judge_language("could not open the file") == "english"
    assert judge_language("не удалось открыть файл") == "russian"
    # one Latin word in a long Russian reply is still Russian (>= 95% of letters)
    assert judge_language("не удалось открыть указанный файл конфигурации пакета X") == "russian"
    assert judge_language("could not open\nне удалось открыть файл") == "mixed"
    assert judge_language("123 / 456 ...") == UNCLASSIFIED
    assert judge_language("") == UNCLASSIFIED


def test_drift_judge():
    assert judge_drift("invalid option\nmissing operand") == "english"
    assert judge_drift("invalid option\nпропущен операнд") == "drift"
    assert judge_drift("неверный параметр") == "russian"
    assert judge_drift("  ") == UNCLASSIFIED


def test_behaviors_name_their_sets_and_labels():
    lang, drift = behavior("language"), behavior("drift")
    assert lang.labels == ("english", "russian") and lang.pairs == "builtin:language"
    assert drift.labels == ("english", "drift") and drift.eval_set == "builtin:drift"
    # the judges the behaviors run are the script judges
    assert lang.judge_rule("hello there friend") == "english"
    assert drift.judge_rule("hello there\nпривет") == "drift"


def test_language_pairs_differ_only_in_the_reply_language():
    ps = load_pairs("builtin:language")
    assert len(ps) == 300
    prompt_langs = set()
    for p in ps.pairs:
        r0, r1 = p.target_0, p.target_1
        assert judge_language(r0) == "english" and judge_language(r1) == "russian", (r0, r1)
        assert r0.count("\n") == r1.count("\n")  # the same messages, translated
        prompt_langs.add(judge_language(p.messages_0[0]["content"]))
    assert prompt_langs == {"english", "russian"}


def test_drift_pairs_share_their_english_start():
    ps = load_pairs("builtin:drift")
    assert len(ps) == 300
    for p in ps.pairs:
        r0, r1 = p.target_0, p.target_1
        assert judge_language(r0) == "english" and judge_drift(r1) == "drift"
        assert r0.split("\n")[0] == r1.split("\n")[0]


def test_eval_sets_are_held_out_from_both_pair_sets_and_sized_for_the_acceptance():
    lang, drift = load_eval_set("builtin:language"), load_eval_set("builtin:drift")
    assert lang.groups == ["en", "ru"]
    assert [sum(i.group == g for i in lang.items) for g in ("en", "ru")] == [48, 48]
    assert len(drift) == 64
    for it in lang.items:
        assert judge_language(it.prompt) == ("english" if it.group == "en" else "russian")
    pair_prompts = {normalize(p.messages_0[0]["content"]) for name in ("language", "drift")
                    for p in load_pairs(f"builtin:{name}").pairs}
    for es in (lang, drift):
        assert not pair_prompts & {normalize(i.prompt) for i in es.items}


def test_bilingual_model_is_bundled_and_small():
    assert BILINGUAL_MODEL.is_file() and BILINGUAL_MODEL.stat().st_size <= 20 * 1024 * 1024


@pytest.fixture(scope="module")
def bilingual_llm():
    from steer_gguf.engine.steered import SteeredLlama

    llm = SteeredLlama(BILINGUAL_MODEL, n_ctx=512, n_threads=1, n_threads_batch=1)
    yield llm
    llm.close()


def test_bilingual_model_shape_and_tokenizer(bilingual_llm):
    i = bilingual_llm.info
    assert (i.architecture, i.n_layer, i.n_expert) == ("qwen3moe", 8, 32) and 2 <= i.n_expert_used <= 4
    text = "не удалось открыть файл"
    toks = bilingual_llm.tokenize(text.encode(), add_bos=False, special=False)
    assert bilingual_llm.detokenize(toks).decode() == text and len(toks) < len(text) // 2


def test_replies_follow_the_prompt_language(bilingual_llm):
    """Greedy, unsteered: the model answers English prompts in English and Russian ones in Russian
    most of the time (what it was trained to do; drift is sampled, so greedy rarely drifts)."""
    es = load_eval_set("builtin:language")
    hits = {"en": 0, "ru": 0}
    for it in es.items[:12] + es.items[48:60]:
        r = bilingual_llm.create_chat_completion(messages=it.messages, max_tokens=32, temperature=0.0)
        label = judge_language(r["choices"][0]["message"]["content"] or "")
        hits[it.group] += label == ("english" if it.group == "en" else "russian")
    assert hits["en"] >= 9 and hits["ru"] >= 9, hits


def test_detection_finds_language_experts(bilingual_llm):
    """Reply tokens of the two languages take different experts: the largest |risk_diff| on 48
    language pairs is far above anything a permutation of the pairs gives."""
    from steer_gguf.detect.risk import detect

    t = detect(bilingual_llm, load_pairs("builtin:language", max_pairs=48), bootstrap=50, permutations=50, splits=2)
    assert float(abs(t.risk_diff).max()) >= 0.5
    assert t.meta["trust"]["null"]["beyond"] > 0
    layers = t.by_layer()
    assert len(layers) == 8 and all(0 <= mean <= mx <= 1 for _, mx, mean in layers)


def test_bad_eval_line_for_the_language_behavior_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello"}\n{"prompt": 3}\n', encoding="utf-8")
    prof = tmp_path / "p.json"
    from steer_gguf.model import model_info
    from steer_gguf.profile import ExpertRule, ModelRef, Profile

    Profile(model=ModelRef.of(model_info(BILINGUAL_MODEL)), experts=[ExpertRule(7, 13, "activate")],
            name="en").save(prof)
    r = cli("eval", BILINGUAL_MODEL, "--behavior", "language", "--eval-set", bad, "--profile", prof)
    assert_one_line_error(r, "bad.jsonl", "2")


def test_demo_sets_resolve_for_the_bilingual_model():
    from steer_gguf.front.demo import BILINGUAL_BEHAVIORS, held_out_prompts

    prompts = held_out_prompts("bilingual")
    assert set(prompts) == set(BILINGUAL_BEHAVIORS)
    assert set(prompts["language"]) == {"en", "ru"} and len(prompts["drift"]["main"]) == 64
    assert json.dumps(prompts, ensure_ascii=False)


def test_bilingual_demo_runs_the_workflow_with_controls(tmp_path):
    from steer_gguf.front.demo import run_demo

    lines: list[str] = []
    rates = run_demo(str(tmp_path), n_show=1, n_rates=3, max_pairs=16, n_threads=1, log=lines.append,
                     model="bilingual", controls=1)
    text = "\n".join(lines)
    assert "bilingual.gguf" in text and "no routing supervision" in text
    # the language profiles are reported on the prompts of each language, against their control
    for where in ("toward language-english (ru prompts):", "toward language-russian (en prompts):",
                  "toward drift-english:"):
        assert where in text, text
    assert {r.behavior for r in rates} == {"language/en", "language/ru", "drift"}
    for name in ("language-english", "language-russian", "drift-english", "drift-drift"):
        p = tmp_path / f"{name}.json"
        assert p.is_file()
        r = cli("profile", "validate", p, "--model", BILINGUAL_MODEL)
        assert r.returncode == 0, r.stderr
