//! How a model's large weight matrices are held in memory, chosen per model part in the
//! manifest (Whisper's `"encoder_weights"` and `"decoder_weights"`: `"f16"` or `"fp32"`).
//!
//! Whisper's checkpoint is fp16; the ONNX export widens it to fp32 because tract would
//! otherwise keep a Cast of every fp16 initializer in the graph and re-run it on every call.
//! `f16` narrows the matrices back after loading, on the typed graph, so the matrix products
//! read fp16 weights with fp32 activations and fp32 accumulation (tract's x86 FMA and arm64
//! kernels pack an fp16 A beside an fp32 B), and an embedding table is gathered in fp16 and
//! widened per row. Nothing is lost against the checkpoint; memory and weight traffic halve.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Matrices smaller than this stay fp32 (biases, norms, positions: a rounding of the
/// activations for no memory worth having).
const MIN_ELEMENTS: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Fp32,
    F16,
}

impl WeightFormat {
    /// A manifest value (`f16`, `fp32`); `default` when absent.
    pub fn parse(value: Option<&str>, default: Self) -> Result<Self, String> {
        match value {
            None => Ok(default),
            Some("f16") => Ok(Self::F16),
            Some("fp32") => Ok(Self::Fp32),
            Some(other) => Err(format!(
                "is `{other}`; this callbox reads `f16` or `fp32` (edit the models folder's manifest.json, or rebuild it \
                 with models/build.sh)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::F16 => "f16",
        }
    }
}

/// The f32 constant feeding `slot` of `node`, if it is a weight matrix worth narrowing.
fn big_f32_const(model: &TypedModel, node: &TypedNode, slot: usize) -> Option<Arc<Tensor>> {
    let fact = model.outlet_fact(*node.inputs.get(slot)?).ok()?;
    let konst = fact.konst.as_ref()?;
    (konst.datum_type() == f32::datum_type() && konst.rank() == 2 && konst.len() >= MIN_ELEMENTS).then(|| konst.clone())
}

fn to_f16(t: &Tensor) -> TractResult<Tensor> {
    Ok(t.cast_to::<f16>()?.into_owned())
}

/// Narrows a decluttered model's weight matrices to fp16: every matrix product's constant
/// operand, and every gathered embedding table (its rows widened back after the gather).
/// Returns how many matrices were narrowed. The fp32 originals are left without users and
/// go with the optimiser's pruning.
pub fn narrow_to_f16(model: &mut TypedModel) -> TractResult<usize> {
    let mut narrowed = 0;
    let ids: Vec<usize> = model.eval_order()?;
    for id in ids {
        let node = model.node(id).clone();
        if let Some(einsum) = node.op_as::<EinSum>() {
            if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() {
                continue;
            }
            let Some((slot, weights)) =
                (0..node.inputs.len()).find_map(|s| big_f32_const(model, &node, s).map(|w| (s, w)))
            else {
                continue;
            };
            let mut patch = TypedModelPatch::default();
            let mut taps = patch.taps(model, &node.inputs)?;
            taps[slot] = patch.add_const(format!("{}.w_f16", node.name), to_f16(&weights)?)?;
            let out = patch.wire_node(&node.name, einsum.clone(), &taps)?;
            patch.shunt_outside(model, id.into(), out[0])?;
            patch.apply(model)?;
            narrowed += 1;
        } else if let Some(gather) = node.op_as::<Gather>() {
            let Some(table) = big_f32_const(model, &node, 0) else { continue };
            let mut patch = TypedModelPatch::default();
            let mut taps = patch.taps(model, &node.inputs)?;
            taps[0] = patch.add_const(format!("{}.table_f16", node.name), to_f16(&table)?)?;
            let rows =
                patch.wire_node(format!("{}.f16", node.name), Gather { output_type: None, ..gather.clone() }, &taps)?;
            let out = patch.wire_node(&node.name, cast(f32::datum_type()), &rows)?;
            patch.shunt_outside(model, id.into(), out[0])?;
            patch.apply(model)?;
            narrowed += 1;
        }
    }
    Ok(narrowed)
}
