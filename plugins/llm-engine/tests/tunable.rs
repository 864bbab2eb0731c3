//! The trainable models: gradients really reach every adapter tensor and agree with finite
//! differences through a whole tiny model of each family; the Llama forward in Hugging Face
//! layout computes what the inference engine computes on the real SmolLM2 GGUF; adapters round
//! trip through PEFT's format and refuse a model they do not fit.

use candle_core::{Device, Tensor};
use recfuse_llm_engine::tunable::chatglm::{write_random_checkpoint, ChatGlm, ChatGlmConfig};
use recfuse_llm_engine::tunable::llama::{Llama, LlamaDims};
use recfuse_llm_engine::tunable::lora::{Adapter, LoraSpec, LoraStack};
use recfuse_llm_engine::tunable::{answer_log_probs, score, Base, CausalLm, Sequence};
use recfuse_sdk::SeededRng;
use std::path::PathBuf;

fn tiny_llama() -> Llama {
    let d = LlamaDims {
        layers: 2,
        dim: 32,
        heads: 4,
        kv_heads: 2,
        ffn: 48,
        vocab: 40,
        context: 64,
    };
    Llama::random(&d, &mut SeededRng::new(1)).unwrap()
}

fn tiny_chatglm() -> ChatGlm {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &ChatGlmConfig::tiny(40), &["a", "b"], 2).unwrap();
    ChatGlm::load(dir.path()).unwrap()
}

fn all_modules(model: &dyn CausalLm) -> LoraSpec {
    LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: model.modules().iter().map(|m| m.name.to_string()).collect(),
    }
}

/// An adapter with B random too (a fresh one has B = 0, which zeroes A's gradient).
fn random_adapter(model: &dyn CausalLm, seed: u64) -> Adapter {
    let mut rng = SeededRng::new(seed);
    let a = Adapter::new("default", &all_modules(model), model, &mut rng).unwrap();
    for (name, var) in a.named_vars(model) {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| (rng.normal() * 0.3) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    a
}

fn seqs() -> Vec<Sequence> {
    vec![
        Sequence {
            ids: vec![3, 5, 7, 9, 11, 13, 2],
            answer_start: 4,
        },
        Sequence {
            ids: vec![4, 6, 8, 10, 12],
            answer_start: 3,
        },
    ]
}

fn loss(model: &dyn CausalLm, adapter: &Adapter) -> Tensor {
    let lp = answer_log_probs(model, &seqs(), None, &LoraStack::eval(vec![adapter])).unwrap();
    lp.mean_all().unwrap().neg().unwrap()
}

fn check_gradients(model: &dyn CausalLm) {
    let adapter = random_adapter(model, 7);
    let grads = loss(model, &adapter).backward().unwrap();
    let vars = adapter.named_vars(model);
    assert_eq!(vars.len(), model.layers() * model.modules().len() * 2);
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    // Central differences on a few entries of every tensor of layer 0 (its gradient passes
    // through every later layer's norms, rotary embedding and softmax) and the last layer.
    let mut checked = 0;
    for (name, var) in vars.iter().filter(|(n, _)| {
        n.contains(".layers.0.") || n.contains(&format!(".layers.{}.", model.layers() - 1))
    }) {
        let g: Vec<f32> = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(model, &adapter).to_scalar::<f32>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (numeric - g[idx]).abs();
            assert!(
                err <= 2e-3 + 0.05 * g[idx].abs(),
                "{name}[{idx}]: backprop {} vs finite difference {numeric}",
                g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

#[test]
fn llama_gradients_reach_every_adapter_and_match_finite_differences() {
    check_gradients(&tiny_llama());
}

#[test]
fn chatglm_gradients_reach_every_adapter_and_match_finite_differences() {
    check_gradients(&tiny_chatglm());
}

#[test]
fn soft_tokens_replace_embeddings() {
    let model = tiny_llama();
    let s = seqs();
    let plain = answer_log_probs(&model, &s[..1], None, &LoraStack::none()).unwrap();
    let ids = Tensor::new(s[0].ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let same = answer_log_probs(
        &model,
        &s[..1],
        Some(model.embed(&ids).unwrap()),
        &LoraStack::none(),
    )
    .unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&plain, &same) < 1e-6);
    // A different vector at a prompt position changes the answer's likelihood.
    let mut e = model.embed(&ids).unwrap();
    let soft = Tensor::ones((1, 1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    e = e.slice_assign(&[0..1, 1..2, 0..32], &soft).unwrap();
    let changed = answer_log_probs(&model, &s[..1], Some(e), &LoraStack::none()).unwrap();
    assert!(diff(&plain, &changed) > 1e-4);
}

#[test]
fn peft_round_trip_and_mismatch_errors() {
    let model = tiny_chatglm();
    let adapter = random_adapter(&model, 3);
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(dir.path(), &model, "tiny").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 2);
    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor("base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_A.weight").unwrap();
    assert_eq!(a.shape(), [2, 32]);
    let b = st.tensor("base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight").unwrap();
    assert_eq!(b.shape(), [(4 + 2 * 2) * 8, 2]);

    let back = Adapter::load_peft("default", dir.path(), &model).unwrap();
    let l1 = loss(&model, &adapter).to_scalar::<f32>().unwrap();
    let l2 = loss(&model, &back).to_scalar::<f32>().unwrap();
    assert_eq!(l1, l2, "a reloaded adapter computes exactly the same");
    // An adapter of another family does not load, and says why.
    let err = Adapter::load_peft("default", dir.path(), &tiny_llama())
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("no module `query_key_value`"),
        "{err:#}"
    );
    let spec = LoraSpec {
        r: 0,
        ..all_modules(&model)
    };
    assert!(format!(
        "{:#}",
        Adapter::new("x", &spec, &model, &mut SeededRng::new(0))
            .err()
            .unwrap()
    )
    .contains("`rank`"));
}

fn smollm2() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "SmolLM2 missing: run scripts/fetch-data.sh smollm2 (scripts/test.sh does)"
    );
    p
}

/// The trainable forward (dequantized weights, Q/K rows back in Hugging Face order, half
/// rotation) predicts what the inference engine (GGUF layout, interleaved rotation) predicts.
#[test]
fn smollm2_trainable_forward_matches_the_inference_engine() {
    let base = Base::load(&smollm2()).unwrap();
    assert_eq!(base.model.family(), "llama");
    assert_eq!(base.sha256.len(), 64);
    let prompt = base
        .prompt_ids("Answer Yes or No.", "Does the user like thrillers?")
        .unwrap();
    let llm = recfuse_llm_engine::Llm::load(&smollm2(), recfuse_llm_engine::Kernel::best(true)).unwrap();
    let expected = &llm
        .next_token_logits(std::slice::from_ref(&prompt))
        .unwrap()[0];
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = base
        .model
        .hidden(&base.model.embed(&ids).unwrap(), &LoraStack::none())
        .unwrap();
    let last = hidden
        .narrow(1, prompt.len() - 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let ours: Vec<f32> = base
        .model
        .logits(&last)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    assert_eq!(argmax(&ours), argmax(expected));
    let dot: f32 = ours.iter().zip(expected).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cosine = dot / norm(&ours) / norm(expected);
    // The engine re-quantizes Q4_1 to 8 bits for speed (and, with the int8 kernel, its
    // activations too); a wrong Q/K layout gives < 0.9.
    assert!(cosine > 0.995, "cosine {cosine}");
    // The answer ends with the chat's end-of-turn token.
    let answer = base.answer_ids("Yes").unwrap();
    assert_eq!(answer.last(), llm.tokenizer.stop.last());
}

/// The block-by-block backward the tuner uses computes the gradients one whole-graph
/// `backward()` does.
#[test]
fn blockwise_backward_equals_whole_graph_backward() {
    for model in [&tiny_llama() as &dyn CausalLm, &tiny_chatglm()] {
        let adapter = random_adapter(model, 5);
        let vars: Vec<_> = adapter
            .named_vars(model)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let whole = loss(model, &adapter).backward().unwrap();
        let n = seqs().iter().map(Sequence::answer_len).sum::<usize>() as f64;
        let mut grads = vec![None; vars.len()];
        let value = recfuse_llm_engine::tunable::answer_loss_backward(
            model,
            &seqs(),
            None,
            &LoraStack::eval(vec![&adapter]),
            1.0 / n,
            &vars,
            &mut grads,
        )
        .unwrap();
        assert!((value - loss(model, &adapter).to_scalar::<f32>().unwrap() as f64).abs() < 1e-5);
        for (var, g) in vars.iter().zip(&grads) {
            let expected = whole.get(var).unwrap();
            let diff = recfuse_llm_engine::tunable::ops::max_abs_diff(expected, g.as_ref().expect("a gradient")).unwrap();
            assert!(diff < 1e-5, "{} gradient differs by {diff}", model.family());
        }
    }
}

/// Queries sharing a 12-token prefix: candidate suffixes of different lengths, read at the
/// last position (yes/no style) and along an answer (likelihood style).
fn prefix_queries(vocab: u32) -> Vec<score::Query> {
    let prefix: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % vocab).collect();
    let mut out = Vec::new();
    for (c, len) in [3usize, 5, 1, 4, 6].iter().enumerate() {
        let mut ids = prefix.clone();
        ids.extend((0..*len).map(|j| ((c * 11 + j * 5 + 1) as u32) % vocab));
        out.push(score::Query::next_token(ids.clone(), &[1, 2]));
        if *len >= 2 {
            // The candidate's first token ends the prompt, the rest is its answer.
            out.push(score::Query::answer(&Sequence { answer_start: prefix.len() + 1, ids }));
        }
    }
    out
}

/// Scoring with the prefix run once and its keys and values reused gives what a full forward
/// of every sequence gives, in both families, with an adapter active, across several batches.
#[test]
fn prefix_reuse_scores_equal_full_forwards() {
    for model in [&tiny_llama() as &dyn CausalLm, &tiny_chatglm()] {
        let adapter = random_adapter(model, 9);
        let lora = LoraStack::frozen(vec![&adapter]);
        let queries = prefix_queries(40);
        let (full, full_work) = score::log_probs(model, &lora, &queries, false, 64).unwrap();
        let (reused, work) = score::log_probs(model, &lora, &queries, true, 16).unwrap();
        assert_eq!(work.prefix, 12, "{}", model.family());
        assert!(work.tokens < full_work.tokens && work.passes > 2);
        // The full path agrees with the training path's answer log-probabilities.
        let answers: Vec<Sequence> = queries
            .iter()
            .filter(|q| q.picks.len() > 2 || q.picks[0].1 != 1)
            .map(|q| Sequence { ids: q.ids.clone(), answer_start: q.picks[0].0 + 1 })
            .collect();
        let trained: Vec<f32> = answer_log_probs(model, &answers, None, &LoraStack::eval(vec![&adapter])).unwrap().to_vec1().unwrap();
        let from_full: Vec<f32> = queries.iter().zip(&full).filter(|(q, _)| q.picks.len() > 2 || q.picks[0].1 != 1).flat_map(|(_, v)| v.clone()).collect();
        assert_eq!(trained.len(), from_full.len());
        for (a, b) in trained.iter().zip(&from_full) {
            assert!((a - b).abs() < 1e-4, "{}: {a} vs {b}", model.family());
        }
        for (f, r) in full.iter().zip(&reused) {
            assert_eq!(f.len(), r.len());
            for (a, b) in f.iter().zip(r) {
                assert!((a - b).abs() < 1e-4, "{}: full {a} vs reused {b}", model.family());
            }
        }
        // A different adapter changes the scores.
        let other = random_adapter(model, 10);
        let (changed, _) = score::log_probs(model, &LoraStack::frozen(vec![&other]), &queries, true, 16).unwrap();
        let moved = reused.iter().flatten().zip(changed.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-2, "{}: adapter changed scores by {moved}", model.family());
    }
}

/// The same on the real SmolLM2: a user's prompt with two candidates (chat format, real
/// tokenizer), read at the answer position.
#[test]
fn smollm2_prefix_reuse_equals_full_prompts() {
    let base = Base::load(&smollm2()).unwrap();
    let knowledge = "The user liked thrillers and science fiction from the 1990s, and rated comedies as average.";
    let queries: Vec<score::Query> = ["Heat (1995)", "Toy Story (1995)", "Alien (1979)"]
        .iter()
        .map(|c| {
            let ids = base.prompt_ids("Will the user interact with the candidate? Answer Yes or No.", &format!("{knowledge}\nCandidate item: {c}")).unwrap();
            let yes = base.answer_ids("Yes").unwrap()[0];
            let no = base.answer_ids("No").unwrap()[0];
            score::Query::next_token(ids, &[yes, no])
        })
        .collect();
    let lora = LoraStack::none();
    let (full, _) = score::log_probs(base.model.as_ref(), &lora, &queries, false, 4096).unwrap();
    let (reused, work) = score::log_probs(base.model.as_ref(), &lora, &queries, true, 4096).unwrap();
    assert!(work.prefix > 20, "prefix {}", work.prefix);
    for (f, r) in full.iter().zip(&reused) {
        for (a, b) in f.iter().zip(r) {
            assert!((a - b).abs() < 1e-4, "full {a} vs reused {b}");
        }
    }
}
