use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Content;
use recfuse_sdk::SeededRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::model::{Kernel, Model};
use crate::prefix::PrefixStore;
use crate::tokenizer::{meta, GgufTokenizer};

/// One chat message, as in the OpenAI Chat Completions protocol.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Called with a prompt's index and its new text as generation produces it.
pub type OnText<'a> = Option<&'a mut dyn FnMut(usize, &str)>;

#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0 = greedy (deterministic).
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Generate exactly `max_new_tokens` (benchmarks).
    pub ignore_stop: bool,
    /// OpenAI's penalties on tokens already generated: each logit is lowered by
    /// `count × frequency_penalty + (count > 0) × presence_penalty`. Small models repeat
    /// themselves under greedy decoding; a little of either helps.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Texts that end the answer (OpenAI's `stop`): the answer is cut before the first one to
    /// appear, and streamed text never shows a part of one.
    pub stop: Vec<String>,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            ignore_stop: false,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop: Vec::new(),
        }
    }
}

/// Lowers the logits of tokens already generated (see [`GenParams::frequency_penalty`]).
fn penalize(logits: &mut [f32], generated: &[u32], p: &GenParams) {
    if p.frequency_penalty == 0.0 && p.presence_penalty == 0.0 {
        return;
    }
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (t, c) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn token.
    Stop,
    /// `max_new_tokens` or the model context.
    Length,
    /// The caller gave up on it (a client that went away): it left the batch early.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    /// The tokens generated (a stop token or a cut stop string's tokens included).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache, not computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub finish: FinishReason,
}

pub struct Llm {
    model: Model,
    pub tokenizer: GgufTokenizer,
    /// The GGUF's chat template, parsed once at load.
    chat: minijinja::Environment<'static>,
    pub path: PathBuf,
    pub name: String,
    /// Prompts already prefilled, reused by prompts that begin the same way (off unless
    /// [`Llm::with_prefix_cache`]).
    prefix: std::sync::Mutex<PrefixStore>,
}

/// A chat template (Jinja, as Hugging Face writes them) parsed once, as template `chat`.
pub(crate) fn chat_environment(template: String) -> Result<minijinja::Environment<'static>> {
    let mut chat = minijinja::Environment::new();
    chat.add_template_owned("chat", template).context("the chat template does not parse")?;
    Ok(chat)
}

impl Llm {
    /// Loads a GGUF model to be run with `kernel` (usually [`Kernel::best`]).
    pub fn load(path: &Path, kernel: Kernel) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening model {}", path.display()))?;
        let content = Content::read(&mut file).with_context(|| format!("{} is not a GGUF file", path.display()))?;
        let mut load = || -> Result<Self> {
            let tokenizer = GgufTokenizer::from_gguf(&content)?;
            let chat = chat_environment(meta(&content, "tokenizer.chat_template")?.to_string()?.clone())?;
            let model = Model::from_gguf(&content, &mut file, kernel)?;
            let name = content
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_else(|| path.file_stem().unwrap_or_default().to_string_lossy().into_owned());
            Ok(Self { model, tokenizer, chat, path: path.to_path_buf(), name, prefix: std::sync::Mutex::new(PrefixStore::new(0, 0)) })
        };
        load().with_context(|| format!("loading model {}", path.display()))
    }

    /// Keeps the keys and values of up to `bytes` of prompts ([`crate::prefix`]): a prompt that
    /// begins like one already prefilled by [`Llm::start`] or [`Llm::join`] computes only the
    /// rest (at least its last token). Reuse moves keys between positions by rotation, so an
    /// answer can differ from an uncached one at a near-tie, as with batch padding.
    pub fn with_prefix_cache(self, bytes: usize) -> Self {
        let per_token = self.kv_bytes_per_token();
        Self { prefix: std::sync::Mutex::new(PrefixStore::new(bytes, per_token)), ..self }
    }

    /// Bytes of keys and values one token takes in the cache (every layer, f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        let h = &self.model.hyper;
        2 * h.layers * h.kv_heads * h.head_dim * 4
    }

    /// Bytes the prefix cache holds.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefix.lock().map(|s| s.bytes()).unwrap_or(0)
    }

    pub fn hyper(&self) -> &crate::Hyper {
        &self.model.hyper
    }

    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }

    /// The model's own chat template (from the GGUF), rendered with a generation prompt.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let out = self
            .chat
            .get_template("chat")?
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .context("rendering the GGUF chat template")?;
        Ok(out)
    }

    /// The token ids of a chat: the template's own text (control tokens included) encoded as
    /// written, each message's content encoded literally ([`GgufTokenizer::encode_literal`]):
    /// a control token typed in a message is text, not a turn boundary.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        const OPEN: char = '\u{E000}';
        const CLOSE: char = '\u{E001}';
        // Render with a private-use marker per message in place of its content, then encode
        // template and contents piece by piece.
        let marked: Vec<Message> = messages.iter().enumerate().map(|(i, m)| Message { role: m.role.clone(), content: format!("{OPEN}{i}{CLOSE}") }).collect();
        let rendered = self.render_chat(&marked)?;
        let mut ids: Vec<u32> = self.tokenizer.bos.into_iter().collect();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(OPEN) {
            ids.extend(self.tokenizer.encode_continuation(&rest[..start])?);
            let after = &rest[start + OPEN.len_utf8()..];
            let end = after.find(CLOSE).context("the chat template cut a message marker")?;
            let i: usize = after[..end].parse().context("the chat template changed a message marker")?;
            ids.extend(self.tokenizer.encode_literal(&messages[i].content)?);
            rest = &after[end + CLOSE.len_utf8()..];
        }
        ids.extend(self.tokenizer.encode_continuation(rest)?);
        Ok(ids)
    }

    /// Prompts left-padded (with eos, masked out of attention) to `longest`, and each one's padding.
    fn left_pad<'a>(&self, prompts: impl Iterator<Item = &'a [u32]>, longest: usize) -> (Vec<Vec<u32>>, Vec<usize>) {
        prompts
            .map(|p| {
                let pad = longest - p.len();
                (std::iter::repeat_n(self.tokenizer.eos, pad).chain(p.iter().copied()).collect(), pad)
            })
            .unzip()
    }

    /// The next-token logits after each prompt, computed as one left-padded batch (reusing and
    /// filling the prefix cache, if there is one).
    pub fn next_token_logits(&self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        anyhow::ensure!(longest > 0 && longest < self.model.hyper.context, "prompts must be 1..{} tokens", self.model.hyper.context);
        let (rows, pads) = self.left_pad(prompts.iter().map(Vec::as_slice), longest);
        let mut cache = self.model.new_cache(pads.clone(), longest)?;
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        Ok(self.prefill(&mut cache, &rows, &prompts, &pads)?.1)
    }

    /// Generates for every prompt, `batch` rows at a time. Prompts are grouped by length so that
    /// little padding is computed; `done(i, completion)` is called as each finishes (in any order),
    /// and generation stops early (remaining prompts untouched) if it returns an error.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &[GenParams],
        batch: usize,
        mut done: impl FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        self.generate_streaming(prompts, params, batch, None, &mut done)
    }

    /// [`Llm::generate`] that also reports text as it is produced: `delta(i, text)` with the
    /// new text of prompt `i` (only whole UTF-8 characters; the final text is in `done`).
    pub fn generate_streaming(
        &self,
        prompts: &[Vec<u32>],
        params: &[GenParams],
        batch: usize,
        mut delta: OnText<'_>,
        done: &mut dyn FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        self.generate_cancellable(prompts, params, batch, delta.take(), done, &|_| false)
    }

    /// [`Self::generate_streaming`], asking `cancelled(i)` before every decoding step: a prompt
    /// whose caller gave up leaves the batch at once (`done` gets it with
    /// [`FinishReason::Cancelled`]) and frees its row.
    pub fn generate_cancellable(
        &self,
        prompts: &[Vec<u32>],
        params: &[GenParams],
        batch: usize,
        mut delta: OnText<'_>,
        done: &mut dyn FnMut(usize, Completion) -> Result<()>,
        cancelled: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        for chunk in order.chunks(batch.max(1)) {
            self.generate_batch(chunk, prompts, params, &mut delta, done, cancelled)?;
        }
        Ok(())
    }

    fn generate_batch(
        &self,
        ids: &[usize],
        prompts: &[Vec<u32>],
        params: &[GenParams],
        delta: &mut OnText<'_>,
        done: &mut dyn FnMut(usize, Completion) -> Result<()>,
        cancelled: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let jobs: Vec<(usize, &[u32], GenParams)> = ids.iter().map(|&i| (i, prompts[i].as_slice(), params[i].clone())).collect();
        let mut batch = self.start(&jobs)?;
        while !batch.is_empty() {
            self.step(&mut batch, delta, done, cancelled)?;
        }
        Ok(())
    }

    /// Starts a batch: the prompts (`(id, tokens, params)`; `id` is what the callbacks of
    /// [`Llm::step`] are called with) left-padded to the longest and prefilled together.
    pub fn start(&self, jobs: &[(usize, &[u32], GenParams)]) -> Result<Decoding> {
        let context = self.model.hyper.context;
        let longest = jobs.iter().map(|j| j.1.len()).max().unwrap_or(0);
        anyhow::ensure!(longest > 0, "empty prompt");
        anyhow::ensure!(longest < context, "prompt of {longest} tokens does not fit the model context of {context}");
        let (rows, pads) = self.left_pad(jobs.iter().map(|j| j.1), longest);
        let most_new = jobs.iter().map(|j| j.2.max_new_tokens).max().unwrap_or(0);
        // Room for the first block of answers; the cache grows as answers do.
        let mut cache = self.model.new_cache(pads.clone(), longest + most_new.clamp(1, KV_BLOCK))?;
        let prompts: Vec<&[u32]> = jobs.iter().map(|j| j.1).collect();
        let (reused, logits) = self.prefill(&mut cache, &rows, &prompts, &pads)?;
        let rows = jobs.iter().zip(reused).zip(logits).map(|(((id, prompt, params), reused), logits)| Row::new(*id, prompt.len(), reused, params.clone(), logits)).collect();
        Ok(Decoding { cache, rows })
    }

    /// Prefills `rows` (left-padded by `pads`) into a fresh `cache`, reusing stored prefixes:
    /// the pass starts at the first column some row still has to compute, every row's earlier
    /// columns being stored keys (moved to its position) or padding, which every query masks.
    /// Stores the prompts afterwards. Returns each row's reused tokens and last logits.
    fn prefill(&self, cache: &mut crate::model::KvCache, rows: &[Vec<u32>], prompts: &[&[u32]], pads: &[usize]) -> Result<(Vec<usize>, Vec<Vec<f32>>)> {
        let mut store = self.prefix.lock().map_err(|_| anyhow::anyhow!("the prefix cache was poisoned by a panic"))?;
        let hits: Vec<Option<crate::prefix::Hit>> = prompts.iter().map(|p| if store.enabled() { store.lookup(p, 1) } else { None }).collect();
        let first = pads.iter().zip(&hits).map(|(p, h)| p + h.as_ref().map_or(0, |h| h.tokens)).min().unwrap_or(0);
        let mut reused = vec![0; rows.len()];
        for (r, hit) in hits.iter().enumerate() {
            let (Some(hit), n) = (hit, first.saturating_sub(pads[r])) else { continue };
            if n == 0 {
                continue;
            }
            let delta = pads[r] as i64 - hit.pad as i64;
            cache.write_row(r, pads[r], &self.model.move_kv(&hit.kv, n, delta)?)?;
            reused[r] = n;
        }
        cache.skip_to(first)?;
        let tail: Vec<Vec<u32>> = rows.iter().map(|r| r[first..].to_vec()).collect();
        let logits: Vec<Vec<f32>> = self.model.forward(&tail, cache)?.to_vec2()?;
        if store.enabled() {
            for (r, prompt) in prompts.iter().enumerate() {
                if !store.holds(prompt) {
                    let kv = cache.copy_row(r, pads[r]..pads[r] + prompt.len())?;
                    store.insert(prompt.to_vec(), pads[r], kv);
                }
            }
        }
        Ok((reused, logits))
    }

    /// Adds a prompt to a running batch between two steps: it is prefilled on its own (its
    /// padding columns skipped), left-padded to the batch's length, and decodes with the others
    /// from the next step on. Only a prompt no longer than the batch ([`Decoding::can_join`])
    /// can join: the batch's rows cannot be moved right (their keys carry their positions).
    pub fn join(&self, batch: &mut Decoding, id: usize, prompt: &[u32], params: GenParams) -> Result<()> {
        anyhow::ensure!(batch.can_join(prompt.len()), "a prompt of {} tokens cannot join a batch at {} tokens", prompt.len(), batch.len());
        let len = batch.cache.len();
        let (rows, pads) = self.left_pad(std::iter::once(prompt), len);
        let mut cache = self.model.new_cache(pads.clone(), batch.cache.capacity())?;
        let (reused, logits) = self.prefill(&mut cache, &rows, &[prompt], &pads)?;
        batch.cache.append_rows(cache)?;
        batch.rows.push(Row::new(id, prompt.len(), reused[0], params, logits.into_iter().next().context("no logits")?));
        Ok(())
    }

    /// One decoding step of every row: each samples its next token from its pending logits; rows
    /// that finish (stop, length, or `cancelled(id)`) go to `done` and leave; the others run one
    /// forward pass together. The cache grows by [`KV_BLOCK`] columns when it is full.
    pub fn step(&self, batch: &mut Decoding, delta: &mut OnText<'_>, done: &mut dyn FnMut(usize, Completion) -> Result<()>, cancelled: &dyn Fn(usize) -> bool) -> Result<()> {
        let context = self.model.hyper.context;
        let mut keep = Vec::with_capacity(batch.rows.len());
        let mut next_rows = Vec::with_capacity(batch.rows.len());
        for (r, row) in batch.rows.iter_mut().enumerate() {
            let i = row.id;
            if cancelled(i) {
                let text = self.tokenizer.decode(&row.out)?;
                done(i, Completion { text, tokens: row.out.clone(), prompt_tokens: row.prompt_len, cached_tokens: row.cached, completion_tokens: row.out.len(), finish: FinishReason::Cancelled })?;
                continue;
            }
            let params = &row.params;
            penalize(&mut row.logits, &row.out, params);
            let token = sample(&row.logits, params, &mut row.rng);
            let mut stopped = !params.ignore_stop && self.tokenizer.stop.contains(&token);
            let stops = &params.stop;
            let mut cut: Option<String> = None; // the answer, ended by a stop string
            if !stopped {
                row.out.push(token);
                if delta.is_some() || !stops.is_empty() {
                    // Decode the whole answer so far: tokens can split a character.
                    let text = self.tokenizer.decode(&row.out)?;
                    let shown = match first_stop(&text, stops) {
                        Some(at) => {
                            stopped = true;
                            cut = Some(text[..at].to_string());
                            at
                        }
                        // Hold back what may be the start of a stop string.
                        None => text.len() - partial_stop(&text, stops),
                    };
                    if let Some(delta) = delta.as_mut() {
                        if shown > row.emitted && !text[..shown].ends_with('\u{FFFD}') && text.is_char_boundary(row.emitted) && text.is_char_boundary(shown) {
                            delta(i, &text[row.emitted..shown]);
                            row.emitted = shown;
                        }
                    }
                }
            }
            let full = row.out.len() >= params.max_new_tokens || batch.cache.len() + 1 >= context;
            if stopped || full {
                let text = match cut {
                    Some(t) => t,
                    None => self.tokenizer.decode(&row.out)?,
                };
                if let Some(delta) = delta.as_mut() {
                    if text.len() > row.emitted && text.is_char_boundary(row.emitted) {
                        delta(i, &text[row.emitted..]);
                    }
                }
                let eos = stopped && row.out.last() != Some(&token);
                done(i, Completion {
                    text,
                    tokens: row.out.clone(),
                    prompt_tokens: row.prompt_len,
                    cached_tokens: row.cached,
                    completion_tokens: row.out.len() + eos as usize,
                    finish: if stopped { FinishReason::Stop } else { FinishReason::Length },
                })?;
            } else {
                keep.push(r);
                next_rows.push(vec![token]);
            }
        }
        if keep.len() < batch.rows.len() {
            if keep.is_empty() {
                batch.rows.clear();
                return Ok(());
            }
            batch.cache.retain(&keep)?;
            let mut rows: Vec<Option<Row>> = std::mem::take(&mut batch.rows).into_iter().map(Some).collect();
            batch.rows = keep.iter().map(|&r| rows[r].take().expect("kept once")).collect();
        }
        if batch.cache.len() + 1 > batch.cache.capacity() {
            batch.cache.grow((batch.cache.capacity() + KV_BLOCK).min(context))?;
        }
        let logits: Vec<Vec<f32>> = self.model.forward(&next_rows, &mut batch.cache)?.to_vec2()?;
        for (row, l) in batch.rows.iter_mut().zip(logits) {
            row.logits = l;
        }
        Ok(())
    }
}

/// Columns the KV cache grows by: memory follows the tokens generated, not `max_tokens`.
pub const KV_BLOCK: usize = 64;

/// One prompt being answered in a [`Decoding`].
struct Row {
    id: usize,
    prompt_len: usize,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    params: GenParams,
    rng: SeededRng,
    out: Vec<u32>,
    /// The logits its next token is sampled from.
    logits: Vec<f32>,
    /// Bytes of text already streamed.
    emitted: usize,
}

impl Row {
    fn new(id: usize, prompt_len: usize, cached: usize, params: GenParams, logits: Vec<f32>) -> Self {
        Self { id, prompt_len, cached, rng: SeededRng::new(params.seed), params, out: Vec::new(), logits, emitted: 0 }
    }
}

/// A batch being decoded ([`Llm::start`], [`Llm::join`], [`Llm::step`]): rows join between
/// steps and leave as they finish (continuous batching).
pub struct Decoding {
    cache: crate::model::KvCache,
    rows: Vec<Row>,
}

impl Decoding {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// Rows decoding.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }
    /// Columns of the cache: every row's (padded) prompt and answer so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }
    /// Columns allocated.
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }
    /// The most tokens a row may still generate: with [`Decoding::len`], the columns the batch
    /// may still need.
    pub fn most_remaining(&self) -> usize {
        self.rows.iter().map(|r| r.params.max_new_tokens.saturating_sub(r.out.len())).max().unwrap_or(0)
    }
    /// The logits row `id` samples its next token from.
    pub fn pending_logits(&self, id: usize) -> Option<&[f32]> {
        self.rows.iter().find(|r| r.id == id).map(|r| r.logits.as_slice())
    }
    /// Whether a prompt of `prompt_len` tokens can join (see [`Llm::join`]).
    pub fn can_join(&self, prompt_len: usize) -> bool {
        prompt_len > 0 && prompt_len <= self.cache.len()
    }
}

/// Where the first of `stops` begins in `text`, if one does.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// The longest end of `text` that is the beginning of a stop string (not yet shown while
/// streaming: the next token may complete it).
fn partial_stop(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// Greedy when temperature is 0, else nucleus sampling with the row's own seeded generator.
fn sample(logits: &[f32], p: &GenParams, rng: &mut SeededRng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    if p.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &v)| (i as u32, ((v - max) / p.temperature).exp())).collect();
    let total: f32 = probs.iter().map(|x| x.1).sum();
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let cut = probs.iter().position(|x| {
        kept += x.1 / total;
        kept >= p.top_p
    });
    probs.truncate(cut.map_or(probs.len(), |c| c + 1));
    let mass: f32 = probs.iter().map(|x| x.1).sum();
    let mut u = rng.unit() as f32 * mass;
    for (t, w) in &probs {
        u -= w;
        if u <= 0.0 {
            return *t;
        }
    }
    probs.last().map_or_else(argmax, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_openai_semantics() {
        let p = GenParams { frequency_penalty: 0.1, presence_penalty: 0.05, ..Default::default() };
        let mut logits = vec![5.0, 4.9, 1.0];
        penalize(&mut logits, &[0, 0, 2], &p);
        // token 0 generated twice: 5 - 2×0.1 - 0.05; token 2 once: 1 - 0.1 - 0.05.
        assert!((logits[0] - 4.75).abs() < 1e-6 && logits[1] == 4.9 && (logits[2] - 0.85).abs() < 1e-6, "{logits:?}");
        assert_eq!(sample(&logits, &p, &mut SeededRng::new(0)), 1);
    }
}
