//! Scoring with a (tuned) model: log-probabilities of chosen tokens of many sequences at once.
//! A ranker's sequences for one user share a long prefix (instruction and knowledge) and
//! differ in a short candidate part, so the shared prefix runs once and its keys and values
//! serve every candidate's suffix; the suffixes run packed together without padding.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

use super::lora::LoraStack;
use super::{AnswerIndex, Attend, CausalLm, Kv, Packing, PickRow, Sequence};

/// A sequence and the tokens to read off it: `log p(token | ids[..=position])` for each
/// `(position, token)` pick.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub ids: Vec<u32>,
    pub picks: Vec<(usize, u32)>,
}

impl Query {
    /// The answer tokens of a prompt-and-answer sequence (its likelihood).
    pub fn answer(seq: &Sequence) -> Self {
        Self { picks: seq.answer_picks().collect(), ids: seq.ids.clone() }
    }

    /// Each of `tokens` as the token after `ids` (e.g. "Yes" and "No" after a prompt).
    pub fn next_token(ids: Vec<u32>, tokens: &[u32]) -> Self {
        let last = ids.len().saturating_sub(1);
        Self {
            picks: tokens.iter().map(|&t| (last, t)).collect(),
            ids,
        }
    }

    /// The longest prefix this query can share: every position it reads must stay in its suffix.
    fn shareable(&self) -> usize {
        let first_read = self.picks.iter().map(|p| p.0).min().unwrap_or(usize::MAX);
        first_read.min(self.ids.len().saturating_sub(1))
    }
}

/// What a [`log_probs`] call computed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    /// Tokens of the prefix run once and shared (0 without reuse).
    pub prefix: usize,
    /// Tokens run through the model (prefix once, plus every suffix; padding excluded).
    pub tokens: usize,
    /// Forward passes.
    pub passes: usize,
}

/// The log-probabilities of every query's picks, in order. With `reuse_prefix`, the longest
/// prefix all queries share runs once, and the queries' suffixes run packed into rows of at
/// most `batch_tokens` tokens (no padding), each attending to the prefix's cached keys and
/// values and to its own earlier tokens. Without, each query runs in full (right-padded rows
/// of similar lengths, at most `batch_tokens` padded tokens per pass): what reuse must equal.
pub fn log_probs(
    model: &dyn CausalLm,
    lora: &LoraStack,
    queries: &[Query],
    reuse_prefix: bool,
    batch_tokens: usize,
) -> Result<(Vec<Vec<f32>>, Work)> {
    let mut work = Work::default();
    if queries.is_empty() {
        return Ok((vec![], work));
    }
    ensure!(queries.iter().all(|q| !q.ids.is_empty()), "an empty sequence cannot be scored");
    let prefix = if reuse_prefix && queries.len() > 1 { shared_prefix(queries) } else { 0 };
    work.prefix = prefix;
    work.tokens = prefix + queries.iter().map(|q| q.ids.len() - prefix).sum::<usize>();
    // Similar lengths together: less padding, and chunks of like size.
    let mut order: Vec<usize> = (0..queries.len()).collect();
    order.sort_by_key(|&i| queries[i].ids.len());
    let past = if prefix > 0 { Some(run_prefix(model, lora, &queries[0].ids[..prefix])?) } else { None };
    work.passes += past.is_some() as usize;
    let mut out = vec![Vec::new(); queries.len()];
    let mut start = 0;
    while start < order.len() {
        // Packed rows cost their tokens, padded rows their longest × rows.
        let cost = |end: usize| -> usize {
            let lens = order[start..end].iter().map(|&i| queries[i].ids.len() - prefix);
            if past.is_some() { lens.sum() } else { lens.max().unwrap_or(0) * (end - start) }
        };
        let mut end = start + 1;
        while end < order.len() && cost(end + 1) <= batch_tokens {
            end += 1;
        }
        let chunk = &order[start..end];
        let suffix = |i: usize| -> PickRow {
            let q = &queries[i];
            (&q.ids[prefix..], q.picks.iter().map(|&(p, t)| (p - prefix, t)).collect())
        };
        let lp: Vec<f32> = match &past {
            Some(past) => {
                let (mut ids, mut picks, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
                for &i in chunk {
                    let (s, p) = suffix(i);
                    picks.extend(p.into_iter().map(|(pos, t)| (pos + ids.len(), t)));
                    ids.extend_from_slice(s);
                    lengths.push(s.len());
                }
                let index = AnswerIndex::from_rows(&[(&ids[..], picks)])?;
                let packing = Packing::new(prefix, &lengths)?;
                let mut x = model.embed(&index.ids)?;
                for (i, kv) in past.iter().enumerate() {
                    x = model.layer_kv(i, &x, Attend::Packed { past: kv, packing: &packing }, lora)?.0;
                }
                index.log_probs(model, &x)?.to_vec1()?
            }
            None => {
                let rows: Vec<_> = chunk.iter().map(|&i| suffix(i)).collect();
                let index = AnswerIndex::from_rows(&rows)?;
                let mut x = model.embed(&index.ids)?;
                for i in 0..model.layers() {
                    x = model.layer(i, &x, lora)?;
                }
                index.log_probs(model, &x)?.to_vec1()?
            }
        };
        work.passes += 1;
        let mut at = 0;
        for &i in chunk {
            let n = queries[i].picks.len();
            out[i] = lp[at..at + n].to_vec();
            at += n;
        }
        start = end;
    }
    Ok((out, work))
}

/// Every block's keys and values of `ids` (one row), laid out for reuse.
fn run_prefix(model: &dyn CausalLm, lora: &LoraStack, ids: &[u32]) -> Result<Vec<Kv>> {
    let mut x = model.embed(&Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu)?)?;
    let mut kvs = Vec::with_capacity(model.layers());
    for i in 0..model.layers() {
        let (y, kv) = model.layer_kv(i, &x, Attend::Causal, lora)?;
        x = y;
        kvs.push(Kv { k: kv.k.contiguous()?, v: kv.v.contiguous()? });
    }
    Ok(kvs)
}

/// The longest common prefix of all queries' ids that leaves every read position in its suffix.
fn shared_prefix(queries: &[Query]) -> usize {
    let first = &queries[0].ids;
    let mut n = queries.iter().map(Query::shareable).min().unwrap_or(0);
    for q in &queries[1..] {
        n = n.min(first.iter().zip(&q.ids).take_while(|(a, b)| a == b).count());
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_stops_where_ids_differ_or_a_read_begins() {
        let q = |ids: &[u32], read: usize| Query { ids: ids.to_vec(), picks: vec![(read, 0)] };
        assert_eq!(shared_prefix(&[q(&[1, 2, 3, 4], 3), q(&[1, 2, 5, 6], 3)]), 2);
        // The read at position 1 must be computed in the suffix.
        assert_eq!(shared_prefix(&[q(&[1, 2, 3, 4], 1), q(&[1, 2, 3, 6], 3)]), 1);
        // Identical sequences still keep their last token for the suffix.
        assert_eq!(shared_prefix(&[q(&[1, 2, 3], 2), q(&[1, 2, 3], 2)]), 2);
    }
}
