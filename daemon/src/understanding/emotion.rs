//! Per-utterance emotion: text sentiment, the customer's intent, and arousal from prosody
//! measured against the same speaker's baseline in this call.
//!
//! Arousal: the utterance's median F0 at least 15 % above the speaker's running mean (about
//! 2.4 semitones: a raised voice, beyond ordinary intonation), or its level at least 4 dB
//! above the speaker's mean, or speaking rate at least 30 % above it. The baseline needs two
//! earlier utterances of the speaker; before that nothing counts as aroused (no reference).
//! Then: negative text, or arousal with a negative intent (complaint, refusal, budget,
//! do-not-call) → `negative`; hesitation intent, or neutral text with two or more pauses →
//! `hesitant`; positive text or purchase intent → `positive`; otherwise `neutral`.

use serde::Serialize;

use super::intent::Intent;
use crate::speech::prosody::Prosody;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Emotion {
    Neutral,
    Positive,
    Negative,
    Hesitant,
}

impl Emotion {
    pub fn name(self) -> &'static str {
        match self {
            Self::Neutral => "neutral",
            Self::Positive => "positive",
            Self::Negative => "negative",
            Self::Hesitant => "hesitant",
        }
    }
}

pub const F0_RISE: f32 = 1.15;
pub const LEVEL_RISE_DB: f32 = 4.0;
pub const RATE_RISE: f32 = 1.3;
/// Earlier utterances of a speaker needed before arousal is judged.
pub const BASELINE_MIN: u32 = 2;
const NEGATIVE_INTENTS: [Intent; 4] = [Intent::Complaint, Intent::Refusal, Intent::BudgetConcern, Intent::DoNotCall];

/// One speaker's running means in this call.
#[derive(Debug, Clone, Default)]
pub struct SpeakerBaseline {
    f0: (f32, u32),
    level: (f32, u32),
    rate: (f32, u32),
}

fn mean(m: (f32, u32)) -> Option<f32> {
    (m.1 >= BASELINE_MIN).then(|| m.0 / m.1 as f32)
}

impl SpeakerBaseline {
    /// Whether this utterance is aroused against the baseline so far; then adds it.
    pub fn aroused_then_add(&mut self, p: &Prosody) -> bool {
        let f0 = p.f0_median_hz.zip(mean(self.f0)).is_some_and(|(x, m)| x >= m * F0_RISE);
        let level = mean(self.level).is_some_and(|m| p.energy_dbfs >= m + LEVEL_RISE_DB);
        let rate = mean(self.rate).is_some_and(|m| m > 0.0 && p.rate_per_min >= m * RATE_RISE);
        if let Some(x) = p.f0_median_hz {
            self.f0 = (self.f0.0 + x, self.f0.1 + 1);
        }
        self.level = (self.level.0 + p.energy_dbfs, self.level.1 + 1);
        if p.rate_per_min > 0.0 {
            self.rate = (self.rate.0 + p.rate_per_min, self.rate.1 + 1);
        }
        f0 || level || rate
    }
}

/// Combines the text sentiment label, the intent label and arousal.
pub fn judge(sentiment: &str, intent: Option<Intent>, aroused: bool, pauses: usize) -> Emotion {
    let negative_intent = intent.is_some_and(|i| NEGATIVE_INTENTS.contains(&i));
    if sentiment == "negative" && (aroused || negative_intent || intent.is_none()) || aroused && negative_intent {
        return Emotion::Negative;
    }
    if intent == Some(Intent::Hesitation) || (sentiment == "neutral" && pauses >= 2) {
        return Emotion::Hesitant;
    }
    // Polite words are not satisfaction: "please stop calling me" reads positive as text.
    let unwelcome = negative_intent || intent == Some(Intent::HumanRequest);
    if sentiment == "positive" && !unwelcome || intent == Some(Intent::PurchaseIntent) {
        return Emotion::Positive;
    }
    Emotion::Neutral
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prosody(f0: f32, level: f32, rate: f32) -> Prosody {
        Prosody {
            f0_median_hz: Some(f0),
            f0_range_semitones: None,
            voiced_ratio: 0.5,
            energy_dbfs: level,
            rate_per_min: rate,
            pauses: 0,
            pause_secs: 0.0,
        }
    }

    #[test]
    fn arousal_is_relative_to_the_speakers_own_baseline() {
        let mut b = SpeakerBaseline::default();
        // A high-pitched speaker is not aroused by being high-pitched: no baseline yet.
        assert!(!b.aroused_then_add(&prosody(260.0, -20.0, 200.0)));
        assert!(!b.aroused_then_add(&prosody(250.0, -21.0, 210.0)));
        assert!(!b.aroused_then_add(&prosody(270.0, -19.0, 220.0)), "within ordinary variation");
        assert!(b.aroused_then_add(&prosody(320.0, -20.0, 200.0)), "F0 +23 %");
        let mut b = SpeakerBaseline::default();
        b.aroused_then_add(&prosody(120.0, -25.0, 180.0));
        b.aroused_then_add(&prosody(120.0, -25.0, 180.0));
        assert!(b.aroused_then_add(&prosody(120.0, -20.0, 180.0)), "5 dB louder");
        assert!(!b.aroused_then_add(&prosody(120.0, -24.0, 190.0)));
    }

    #[test]
    fn text_intent_and_arousal_combine() {
        assert_eq!(judge("negative", Some(Intent::from_label("complaint")), false, 0), Emotion::Negative);
        assert_eq!(
            judge("neutral", Some(Intent::from_label("complaint")), true, 0),
            Emotion::Negative,
            "a raised complaint"
        );
        assert_eq!(
            judge("neutral", Some(Intent::from_label("complaint")), false, 0),
            Emotion::Neutral,
            "a calm complaint stays neutral"
        );
        assert_eq!(judge("neutral", Some(Intent::from_label("hesitation")), false, 0), Emotion::Hesitant);
        assert_eq!(judge("neutral", Some(Intent::from_label("other")), false, 3), Emotion::Hesitant, "halting speech");
        assert_eq!(judge("positive", Some(Intent::from_label("price_inquiry")), false, 0), Emotion::Positive);
        assert_eq!(judge("neutral", Some(Intent::from_label("purchase_intent")), false, 0), Emotion::Positive);
        assert_eq!(
            judge("negative", Some(Intent::from_label("price_inquiry")), false, 0),
            Emotion::Neutral,
            "text alone is weak evidence"
        );
        assert_eq!(judge("negative", None, false, 0), Emotion::Negative, "the agent: text only");
        assert_eq!(
            judge("positive", Some(Intent::from_label("do_not_call")), false, 0),
            Emotion::Neutral,
            "a polite do-not-call is not a happy customer"
        );
        assert_eq!(judge("positive", Some(Intent::from_label("human_request")), false, 0), Emotion::Neutral);
    }
}
