//! Conversions between wire tensors ([`fledge_channel::Tensors`], safetensors layout) and
//! aggregation weights ([`fledge_algorithms::Weights`]).

use fledge_algorithms::{Tensor, Weights};
use fledge_channel::{Kind, Message, Tensors};

use crate::{Error, Result};

/// The weights as wire tensors (`f32`, names and order kept).
pub fn weights_to_tensors(weights: &Weights) -> Result<Tensors> {
    weights
        .tensors()
        .iter()
        .map(|t| {
            fledge_channel::Tensor::from_f32(t.shape().to_vec(), t.data())
                .map(|w| (t.name().to_owned(), w))
                .map_err(|e| Error::Tensors(format!("tensor {}: {e}", t.name())))
        })
        .collect()
}

/// Wire tensors as weights; every tensor must be a float type (converted to `f32`).
pub fn tensors_to_weights(tensors: &Tensors) -> Result<Weights> {
    let mut res = Weights::new();
    for (name, tensor) in tensors.iter() {
        let data =
            tensor.to_f32_vec().map_err(|e| Error::Tensors(format!("tensor {name}: {e}")))?;
        let t = Tensor::new(name, tensor.shape().to_vec(), data)
            .map_err(|e| Error::Tensors(format!("tensor {name}: {e}")))?;
        res.push(t).map_err(|e| Error::Tensors(format!("tensor {name}: {e}")))?;
    }
    Ok(res)
}

/// A message of `kind` for `round` carrying `weights`, with `model_version` in the header.
pub fn weights_message(
    kind: Kind,
    round: u64,
    model_version: u64,
    weights: &Weights,
) -> Result<Message> {
    let mut message = Message::new(kind, round);
    message.model_version = model_version;
    message.tensors = weights_to_tensors(weights)?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_names_shapes_and_values() {
        let w = Weights::from_tensors(vec![
            Tensor::new("fc1.weight", vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("t"),
            Tensor::new("fc1.bias", vec![2], vec![-1.0, 0.5]).expect("t"),
        ])
        .expect("w");
        let m = weights_message(Kind::Weights, 3, 2, &w).expect("message");
        assert_eq!((m.round, m.model_version), (3, 2));
        assert_eq!(tensors_to_weights(&m.tensors).expect("back"), w);
        let bad = Tensors::from_iter([(
            "ids".to_owned(),
            fledge_channel::Tensor::from_i64(vec![1], &[3]).expect("t"),
        )]);
        let err = tensors_to_weights(&bad);
        assert!(err.is_err_and(|e| e.to_string().contains("ids")));
    }
}
