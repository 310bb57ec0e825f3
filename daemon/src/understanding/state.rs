//! Call phase, context memory and the customer's tags for one call, sans-IO: fed each
//! utterance's leg, time, masked text, intents (every label the classifier returned: "get
//! me a person and stop calling" counts as both) and emotion.
//!
//! Phases only move forward: opening → needs discovery (the customer asks about price,
//! product or customisation, or 30 s have passed) → objection handling (budget,
//! competitor, hesitation, refusal, complaint) → closing (purchase, callback, do-not-call,
//! or the agent's goodbye). Tags are the customer's, from this call; `crate::customers` keeps
//! them across calls (keyed by a hash of the caller number).

use std::collections::BTreeSet;

use serde::Serialize;

use super::emotion::Emotion;
use super::intent::Intent;
use crate::audio::Leg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Opening,
    NeedsDiscovery,
    ObjectionHandling,
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    PriceSensitive,
    FeatureOriented,
    HighIntent,
    HighValue,
    ComplaintRisk,
    LongTermWatcher,
    DoNotCall,
}

impl Tag {
    /// The tag's name as stored and published.
    pub fn name(self) -> &'static str {
        match self {
            Self::PriceSensitive => "price_sensitive",
            Self::FeatureOriented => "feature_oriented",
            Self::HighIntent => "high_intent",
            Self::HighValue => "high_value",
            Self::ComplaintRisk => "complaint_risk",
            Self::LongTermWatcher => "long_term_watcher",
            Self::DoNotCall => "do_not_call",
        }
    }
}

/// What the call has established so far (utterance indices as evidence).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facts {
    pub budget_mentioned: Option<usize>,
    pub competitor_named: Option<usize>,
    pub callback_asked: Option<usize>,
    pub price_questions: u32,
    pub product_questions: u32,
    pub customization_requests: u32,
    pub hesitations: u32,
    pub negative_utterances: u32,
}

/// Seconds after which an opening without customer questions counts as discovery.
const OPENING_SECS: f64 = 30.0;
const GOODBYES: [&str; 5] = ["再见", "拜拜", "感谢您的时间", "goodbye", "bye"];

#[derive(Debug, Clone, Serialize)]
pub struct CallState {
    pub phase: Phase,
    pub facts: Facts,
    pub tags: BTreeSet<Tag>,
}

impl Default for CallState {
    fn default() -> Self {
        Self { phase: Phase::Opening, facts: Facts::default(), tags: BTreeSet::new() }
    }
}

impl CallState {
    /// One utterance with every intent it carries (none = not classified or `other`);
    /// returns the tags it added.
    pub fn utterance(
        &mut self,
        index: usize,
        leg: Leg,
        start_secs: f64,
        text: &str,
        intents: &[Intent],
        emotion: Option<Emotion>,
    ) -> Vec<Tag> {
        let before = self.tags.clone();
        if start_secs > OPENING_SECS {
            self.advance(Phase::NeedsDiscovery);
        }
        match leg {
            Leg::Agent => {
                let lower = text.to_lowercase();
                if GOODBYES.iter().any(|g| lower.contains(g)) {
                    self.advance(Phase::Closing);
                }
            }
            Leg::Customer => self.customer(index, text, intents, emotion),
        }
        self.tags.difference(&before).copied().collect()
    }

    fn customer(&mut self, index: usize, text: &str, intents: &[Intent], emotion: Option<Emotion>) {
        let f = &mut self.facts;
        if text.contains("预算") || text.contains("budget") {
            f.budget_mentioned.get_or_insert(index);
        }
        if emotion == Some(Emotion::Negative) {
            f.negative_utterances += 1;
        }
        let mut furthest = None;
        for &intent in intents {
            let phase = match intent {
                Intent::PriceInquiry => {
                    f.price_questions += 1;
                    Some(Phase::NeedsDiscovery)
                }
                Intent::ProductQuestion => {
                    f.product_questions += 1;
                    Some(Phase::NeedsDiscovery)
                }
                Intent::CustomizationRequest => {
                    f.customization_requests += 1;
                    Some(Phase::NeedsDiscovery)
                }
                Intent::BudgetConcern => {
                    f.budget_mentioned.get_or_insert(index);
                    Some(Phase::ObjectionHandling)
                }
                Intent::CompetitorComparison => {
                    f.competitor_named.get_or_insert(index);
                    Some(Phase::ObjectionHandling)
                }
                Intent::Hesitation => {
                    f.hesitations += 1;
                    Some(Phase::ObjectionHandling)
                }
                Intent::Refusal | Intent::Complaint => Some(Phase::ObjectionHandling),
                Intent::CallbackRequest => {
                    f.callback_asked.get_or_insert(index);
                    Some(Phase::Closing)
                }
                Intent::PurchaseIntent | Intent::DoNotCall => Some(Phase::Closing),
                Intent::HumanRequest | Intent::Other => None,
            };
            furthest = furthest.max(phase);
        }
        if let Some(p) = furthest {
            self.advance(p);
        }
        let f = &self.facts;
        let says = |i: Intent| intents.contains(&i);
        let rules = [
            (f.budget_mentioned.is_some() || f.price_questions >= 2, Tag::PriceSensitive),
            (f.product_questions + f.customization_requests >= 2, Tag::FeatureOriented),
            (says(Intent::PurchaseIntent), Tag::HighIntent),
            (f.customization_requests >= 3, Tag::HighValue),
            (says(Intent::Complaint) || f.negative_utterances >= 2, Tag::ComplaintRisk),
            (f.hesitations >= 2 || f.callback_asked.is_some() && f.hesitations >= 1, Tag::LongTermWatcher),
            (says(Intent::DoNotCall), Tag::DoNotCall),
        ];
        for (holds, tag) in rules {
            if holds {
                self.tags.insert(tag);
            }
        }
    }

    fn advance(&mut self, to: Phase) {
        self.phase = self.phase.max(to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(state: &mut CallState, steps: &[(Leg, f64, &str, Option<&str>)]) -> Vec<Phase> {
        steps
            .iter()
            .enumerate()
            .map(|(i, &(leg, at, text, intent))| {
                let intents: Vec<Intent> = intent.map(Intent::from_label).into_iter().collect();
                state.utterance(i, leg, at, text, &intents, None);
                state.phase
            })
            .collect()
    }

    #[test]
    fn phases_follow_the_conversation_and_never_go_back() {
        use Leg::{Agent as A, Customer as C};
        let mut s = CallState::default();
        let phases = feed(
            &mut s,
            &[
                (A, 1.0, "您好 我是小王", None),
                (C, 4.0, "什么事", Some("other")),
                (C, 8.0, "这个多少钱", Some("price_inquiry")),
                (C, 12.0, "太贵了 预算不够", Some("budget_concern")),
                (C, 16.0, "有什么功能", Some("product_question")),
                (C, 20.0, "那我买一个吧", Some("purchase_intent")),
                (A, 24.0, "好的 感谢您的时间 再见", None),
            ],
        );
        use Phase::*;
        assert_eq!(phases, [Opening, Opening, NeedsDiscovery, ObjectionHandling, ObjectionHandling, Closing, Closing]);
        assert_eq!(s.facts.budget_mentioned, Some(3));
        assert_eq!(s.tags, BTreeSet::from([Tag::PriceSensitive, Tag::HighIntent]));
    }

    #[test]
    fn time_alone_ends_the_opening() {
        let mut s = CallState::default();
        feed(&mut s, &[(Leg::Agent, 31.0, "我们公司最近有个活动", None)]);
        assert_eq!(s.phase, Phase::NeedsDiscovery);
    }

    #[test]
    fn tags_come_from_what_the_customer_keeps_doing() {
        let mut s = CallState::default();
        let c = |s: &mut CallState, i, intent: &str, emotion| {
            s.utterance(i, Leg::Customer, i as f64, "…", &[Intent::from_label(intent)], emotion)
        };
        assert!(c(&mut s, 0, "customization_request", None).is_empty());
        assert_eq!(c(&mut s, 1, "customization_request", None), [Tag::FeatureOriented]);
        assert_eq!(c(&mut s, 2, "customization_request", None), [Tag::HighValue]);
        assert!(c(&mut s, 3, "hesitation", None).is_empty());
        assert_eq!(c(&mut s, 4, "callback_request", None), [Tag::LongTermWatcher]);
        assert!(c(&mut s, 5, "other", Some(Emotion::Negative)).is_empty());
        assert_eq!(c(&mut s, 6, "refusal", Some(Emotion::Negative)), [Tag::ComplaintRisk]);
        assert_eq!(c(&mut s, 7, "do_not_call", None), [Tag::DoNotCall]);
        assert_eq!(s.facts.callback_asked, Some(4));
    }

    #[test]
    fn every_label_of_a_two_intent_reply_counts() {
        let mut s = CallState::default();
        let both = [Intent::HumanRequest, Intent::DoNotCall];
        assert_eq!(s.utterance(0, Leg::Customer, 2.0, "…", &both, None), [Tag::DoNotCall]);
        assert_eq!(s.phase, Phase::Closing);
        let mut s = CallState::default();
        s.utterance(0, Leg::Customer, 2.0, "…", &[Intent::PriceInquiry, Intent::Hesitation], None);
        assert_eq!((s.facts.price_questions, s.facts.hesitations), (1, 1));
        assert_eq!(s.phase, Phase::ObjectionHandling);
    }
}
