//! Writing ONNX models: a small builder over the ONNX protobuf messages (onnx-protobuf), enough
//! for the feed-forward graphs recfuse trains (Gather, Mul, Concat, Gemm, Relu, Reshape, Add).

use anyhow::Result;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension, type_proto, AttributeProto,
    GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use protobuf::Enum;

/// The opset the graphs are written for (Gemm, Gather, Concat, Reshape, Relu are stable since).
pub const OPSET: i64 = 13;
/// IR version 7 goes with opset 13.
const IR_VERSION: i64 = 7;

/// An element type the builder writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    I64,
}

impl Elem {
    fn code(self) -> i32 {
        match self {
            Elem::F32 => DataType::FLOAT.value(),
            Elem::I64 => DataType::INT64.value(),
        }
    }
}

/// One dimension of an input or output: fixed, or named and free (the batch).
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

/// A graph under construction.
#[derive(Default)]
pub struct Graph {
    graph: GraphProto,
}

fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> ValueInfoProto {
    let shape = TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| {
                let mut dim = onnx_protobuf::tensor_shape_proto::Dimension::new();
                dim.value = Some(match d {
                    Dim::Fixed(n) => dimension::Value::DimValue(*n),
                    Dim::Named(s) => dimension::Value::DimParam((*s).to_string()),
                });
                dim
            })
            .collect(),
        ..Default::default()
    };
    let tensor = type_proto::Tensor { elem_type: elem.code(), shape: Some(shape).into(), ..Default::default() };
    ValueInfoProto { name: name.into(), type_: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }).into(), ..Default::default() }
}

/// An attribute of a node.
pub enum Attr {
    Int(i64),
}

impl Graph {
    pub fn new(name: &str) -> Self {
        Self { graph: GraphProto { name: name.into(), ..Default::default() } }
    }

    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> &mut Self {
        self.graph.input.push(value_info(name, elem, dims));
        self
    }

    pub fn output(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> &mut Self {
        self.graph.output.push(value_info(name, elem, dims));
        self
    }

    /// A float constant (a weight), little-endian raw data.
    pub fn weight(&mut self, name: &str, dims: &[i64], values: &[f32]) -> &mut Self {
        assert_eq!(dims.iter().product::<i64>() as usize, values.len(), "weight {name}: shape and data disagree");
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(TensorProto { name: name.into(), dims: dims.to_vec(), data_type: Elem::F32.code(), raw_data: raw, ..Default::default() });
        self
    }

    /// An int64 constant (a shape).
    pub fn ints(&mut self, name: &str, values: &[i64]) -> &mut Self {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(TensorProto { name: name.into(), dims: vec![values.len() as i64], data_type: Elem::I64.code(), raw_data: raw, ..Default::default() });
        self
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: &[(&str, Attr)]) -> &mut Self {
        let attribute = attrs
            .iter()
            .map(|(name, a)| match a {
                Attr::Int(i) => AttributeProto { name: (*name).into(), type_: AttributeType::INT.into(), i: *i, ..Default::default() },
            })
            .collect();
        let n = self.graph.node.len();
        self.graph.node.push(NodeProto {
            name: format!("{op}_{n}"),
            op_type: op.into(),
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        });
        self
    }

    /// The serialized model, with `metadata` as its metadata properties.
    pub fn to_model_bytes(self, metadata: &[(&str, String)]) -> Result<Vec<u8>> {
        let model = ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }],
            producer_name: "recfuse".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph).into(),
            metadata_props: metadata.iter().map(|(k, v)| StringStringEntryProto { key: (*k).into(), value: v.clone(), ..Default::default() }).collect(),
            ..Default::default()
        };
        Ok(model.write_to_bytes()?)
    }
}
