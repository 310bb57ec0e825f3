//! The intent classifier: hashed character n-grams of the reply and of the agent's last
//! utterance (the featurizer, twin of models/intent/featurize.py) into a small network run
//! by tract. The model gathers the rows of its first layer for the features present
//! (indices[n], values[n]), so a reply costs its few hundred features, not 69,632 buckets.
//!
//! The manifest states the featurizer version and parameters the model was trained with;
//! a model trained with anything else is refused, since its weights would be read through
//! the wrong features silently.

use serde::Serialize;
use tract_onnx::prelude::*;

use crate::speech::{ModelSet, Plan, SpeechError};

pub const FEATURIZER_VERSION: &str = "charngram-fnv1a-v2";
pub const DIMS: usize = 1 << 16;
/// Buckets for the agent's last utterance, after the reply's DIMS.
pub const CONTEXT_DIMS: usize = 1 << 12;
pub const N_MIN: usize = 1;
pub const N_MAX: usize = 4;
/// Longest text classified; longer input is cut (an utterance is at most ~30 s of speech).
pub const MAX_TEXT_CHARS: usize = 1000;

/// Full-width ASCII → ASCII, ASCII upper → lower, anything not alphanumeric → one space,
/// spaces collapsed and trimmed.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars().take(MAX_TEXT_CHARS) {
        let c = match c as u32 {
            0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            _ => c,
        };
        let c = c.to_ascii_lowercase();
        if c.is_alphanumeric() {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        } else {
            pending_space = true;
        }
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811C_9DC5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Sorted (index, value) pairs: n-gram counts of " " + text + " ", L2-normalised.
pub fn features(text: &str) -> Vec<(u32, f32)> {
    hashed_ngrams(text, DIMS as u32, 0)
}

/// The model's input: the reply's features in [0, DIMS), the agent's last utterance's in
/// [DIMS, DIMS + CONTEXT_DIMS); each part L2-normalised on its own.
pub fn features_with_context(text: &str, context: &str) -> Vec<(u32, f32)> {
    let mut out = features(text);
    out.extend(hashed_ngrams(context, CONTEXT_DIMS as u32, DIMS as u32));
    out
}

fn hashed_ngrams(text: &str, dims: u32, offset: u32) -> Vec<(u32, f32)> {
    let norm = normalise(text);
    if norm.is_empty() {
        return Vec::new();
    }
    let chars: Vec<char> = std::iter::once(' ').chain(norm.chars()).chain(std::iter::once(' ')).collect();
    let mut counts = std::collections::BTreeMap::<u32, u32>::new();
    let mut gram = String::new();
    for n in N_MIN..=N_MAX {
        for window in chars.windows(n) {
            gram.clear();
            gram.extend(window);
            *counts.entry(offset + fnv1a(gram.as_bytes()) % dims).or_default() += 1;
        }
    }
    let norm2 = counts.values().map(|&c| f64::from(c) * f64::from(c)).sum::<f64>().sqrt();
    counts.into_iter().map(|(k, c)| (k, (f64::from(c) / norm2) as f32)).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub label: String,
    pub p: f32,
}

/// The customer intents callbox acts on: the intent model's labels
/// (`models/intent/train.py` LABELS). Compared as this enum, never as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Intent {
    PriceInquiry,
    ProductQuestion,
    PurchaseIntent,
    CallbackRequest,
    Hesitation,
    Refusal,
    Complaint,
    HumanRequest,
    BudgetConcern,
    CompetitorComparison,
    CustomizationRequest,
    DoNotCall,
    Other,
}

impl Intent {
    pub const ALL: [Intent; 13] = [
        Self::PriceInquiry,
        Self::ProductQuestion,
        Self::PurchaseIntent,
        Self::CallbackRequest,
        Self::Hesitation,
        Self::Refusal,
        Self::Complaint,
        Self::HumanRequest,
        Self::BudgetConcern,
        Self::CompetitorComparison,
        Self::CustomizationRequest,
        Self::DoNotCall,
        Self::Other,
    ];

    /// The label as the model, the rule files and the protocol spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::PriceInquiry => "price_inquiry",
            Self::ProductQuestion => "product_question",
            Self::PurchaseIntent => "purchase_intent",
            Self::CallbackRequest => "callback_request",
            Self::Hesitation => "hesitation",
            Self::Refusal => "refusal",
            Self::Complaint => "complaint",
            Self::HumanRequest => "human_request",
            Self::BudgetConcern => "budget_concern",
            Self::CompetitorComparison => "competitor_comparison",
            Self::CustomizationRequest => "customization_request",
            Self::DoNotCall => "do_not_call",
            Self::Other => "other",
        }
    }

    /// A model label; one callbox does not know is `Other`.
    pub fn from_label(label: &str) -> Self {
        Self::ALL.into_iter().find(|i| i.name() == label).unwrap_or(Self::Other)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// The best label, or `other` when its probability is under the model's threshold.
    pub label: String,
    pub confidence: f32,
    pub top3: Vec<Scored>,
    /// Every label at or over the threshold, best first (an utterance may carry two
    /// intents: "get me a real person and stop calling me"); `[other]` when none is.
    pub labels: Vec<String>,
}

impl Classification {
    pub fn intent(&self) -> Intent {
        Intent::from_label(&self.label)
    }

    /// Every intent over the threshold, best first.
    pub fn intents(&self) -> Vec<Intent> {
        self.labels.iter().map(|l| Intent::from_label(l)).collect()
    }
}

/// A text classifier over the shared featurizer: the intent model (task `intent`, with a
/// threshold under which the answer is `other`) or the text sentiment model (`sentiment`).
pub struct TextClassifier {
    plan: Plan,
    pub labels: Vec<String>,
    /// Below it the answer is `other` (intent); 0 for models without one.
    pub threshold: f32,
    /// One sigmoid per label (several may be over the threshold) or a softmax (one answer).
    pub output: Output,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Sigmoid,
    Softmax,
}

pub type IntentModel = TextClassifier;

impl TextClassifier {
    /// The intent model: its manifest must give `other` among the labels and a threshold.
    pub fn load(set: &ModelSet) -> Result<Self, SpeechError> {
        Self::load_task(set, "intent", true)
    }

    /// The text sentiment model (negative / neutral / positive).
    pub fn load_sentiment(set: &ModelSet) -> Result<Self, SpeechError> {
        Self::load_task(set, "sentiment", false)
    }

    fn load_task(set: &ModelSet, task: &str, with_threshold: bool) -> Result<Self, SpeechError> {
        let entry = set.for_task(task)?;
        let name = entry.name.clone();
        let refuse = |reason: String| SpeechError::model(&name, reason);
        let featurizer = entry.extra.get("featurizer").cloned().unwrap_or_default();
        let expected = serde_json::json!({
            "version": FEATURIZER_VERSION, "dims": DIMS, "context_dims": CONTEXT_DIMS, "n_min": N_MIN, "n_max": N_MAX
        });
        if featurizer != expected {
            return Err(refuse(format!("trained with featurizer {featurizer}, this callbox computes {expected}")));
        }
        let labels: Vec<String> = entry
            .extra
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .filter(|l: &Vec<String>| !l.is_empty() && (!with_threshold || l.iter().any(|x| x == "other")))
            .ok_or_else(|| refuse("the manifest lists no labels (or, for intents, none called `other`)".into()))?;
        let threshold = match entry.extra.get("threshold").and_then(serde_json::Value::as_f64) {
            Some(t) if (0.0..1.0).contains(&t) => t as f32,
            None if !with_threshold => 0.0,
            _ => return Err(refuse("the manifest gives no threshold in 0..1".into())),
        };
        let output = match entry.extra.get("output").and_then(serde_json::Value::as_str) {
            Some("sigmoid") => Output::Sigmoid,
            Some("softmax") => Output::Softmax,
            other => return Err(refuse(format!("the manifest's output is {other:?}, not \"sigmoid\" or \"softmax\""))),
        };
        let bytes = set.read_verified(entry, "model")?;
        let plan = tract_onnx::onnx()
            .model_for_read(&mut bytes.as_slice())
            .and_then(|mut m| {
                let n = m.symbols.sym("n");
                m.set_input_fact(0, i64::fact([n.to_dim()]).into())?;
                m.set_input_fact(1, f32::fact([n.to_dim()]).into())?;
                Ok(m)
            })
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| SpeechError::model(&name, e))?;
        let model = Self { plan, labels, threshold, output, name };
        // The output must have one probability per label.
        let probe = model.probabilities(&[]).map_err(|e| SpeechError::model(&model.name, e))?;
        if probe.len() != model.labels.len() {
            return Err(SpeechError::model(
                &model.name,
                format!("gives {} outputs for {} labels", probe.len(), model.labels.len()),
            ));
        }
        Ok(model)
    }

    fn probabilities(&self, features: &[(u32, f32)]) -> TractResult<Vec<f32>> {
        // An empty text still needs one row to gather: bucket 0 with weight 0 adds nothing.
        let (indices, values): (Vec<i64>, Vec<f32>) = if features.is_empty() {
            (vec![0], vec![0.0])
        } else {
            features.iter().map(|&(k, v)| (i64::from(k), v)).unzip()
        };
        let n = indices.len();
        let indices = Tensor::from_shape(&[n], &indices)?;
        let values = Tensor::from_shape(&[n], &values)?;
        let out = self.plan.run(tvec!(indices.into_tvalue(), values.into_tvalue()))?;
        crate::cpu::leave_wide_vectors();
        let probs = out.first().ok_or_else(|| TractError::msg("no output"))?;
        Ok(crate::speech::f32s(probs)?.to_vec())
    }

    /// A text on its own (no agent line before it).
    pub fn classify(&self, text: &str) -> Result<Classification, SpeechError> {
        self.classify_in_context(text, "")
    }

    /// A reply read after the agent's last utterance `context` ("" when none): a "yes"
    /// after an offer is not the "yes" after "can I call you later?".
    pub fn classify_in_context(&self, text: &str, context: &str) -> Result<Classification, SpeechError> {
        let probs =
            self.probabilities(&features_with_context(text, context)).map_err(|e| SpeechError::model(&self.name, e))?;
        Ok(self.decide(&probs))
    }

    fn decide(&self, probs: &[f32]) -> Classification {
        let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let name = |i: usize| self.labels.get(i).cloned().unwrap_or_else(|| "other".to_owned());
        let top3: Vec<Scored> = ranked.iter().take(3).map(|&(i, p)| Scored { label: name(i), p }).collect();
        let (best, best_p) = ranked.first().copied().unwrap_or((0, 0.0));
        let over = |&&(i, p): &&(usize, f32)| p >= self.threshold && name(i) != "other";
        let labels: Vec<String> = match self.output {
            // Sigmoids: every label over the threshold; `other` only when none is.
            Output::Sigmoid => ranked.iter().filter(over).map(|&(i, _)| name(i)).collect(),
            // A softmax has one answer: its best label, if over the threshold.
            Output::Softmax => (best_p >= self.threshold).then(|| name(best)).into_iter().collect(),
        };
        let labels = if labels.is_empty() { vec!["other".to_owned()] } else { labels };
        let label = labels[0].clone();
        // The chosen label's own probability; a model without an `other` output gives the
        // best one's when it answers `other`.
        let confidence =
            self.labels.iter().position(|l| *l == label).and_then(|i| probs.get(i).copied()).unwrap_or(best_p);
        Classification { label, confidence, top3, labels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_folds_width_and_case_and_collapses_the_rest() {
        assert_eq!(normalise("  ＡＢＣ，你好！！ World_2 "), "abc 你好 world 2");
        assert_eq!(normalise("[手机号]"), "手机号");
        assert_eq!(normalise("。。。"), "");
    }

    #[test]
    fn features_are_l2_normalised_counts_of_hashed_ngrams() {
        assert!(features("  ").is_empty());
        let f = features("ab");
        // " ab " has 4 + 3 + 2 + 1 n-grams (n = 1..4); the space unigram occurs twice.
        assert_eq!(f.len(), 9);
        let space = f.iter().find(|(k, _)| *k == fnv1a(b" ") % DIMS as u32).unwrap().1;
        assert!((space - 2.0 / 12f32.sqrt()).abs() < 1e-6, "{space}");
        let norm: f32 = f.iter().map(|(_, v)| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-6);
        assert!(f.windows(2).all(|w| w[0].0 < w[1].0), "sorted by index");
        assert_eq!(fnv1a(b"a"), 0xE40C_292C, "FNV-1a reference value");
    }
}
