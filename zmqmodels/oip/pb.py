"""The Open Inference Protocol's gRPC messages (package ``inference``), built at import from the
serialized descriptor of ``grpc_predict_v2.proto`` (beside this file; regenerate the bytes with
``python -m grpc_tools.protoc -I. --descriptor_set_out=...`` or read them from ``--python_out``).

Built into a private descriptor pool, not protobuf's default one: Triton's client registers the
same message names (``inference.ModelInferRequest``...) from its own, larger proto, and both must
load in one process. The field numbers are the same, so either side reads the other's bytes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["SERVICE", "message", "DATA_TYPES"]

SERVICE = "inference.GRPCInferenceService"
_FILE = (
    b'\n\x15grpc_predict_v2.proto\x12\tinference"\x13\n\x11ServerLiveRequest""\n\x12ServerLiveResponse\x12'
    b'\x0c\n\x04live\x18\x01 \x01(\x08"\x14\n\x12ServerReadyRequest"$\n\x13ServerReadyResponse\x12\r\n\x05r'
    b'eady\x18\x01 \x01(\x08"2\n\x11ModelReadyRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07versio'
    b'n\x18\x02 \x01(\t"#\n\x12ModelReadyResponse\x12\r\n\x05ready\x18\x01 \x01(\x08"\x17\n\x15ServerMetada'
    b'taRequest"K\n\x16ServerMetadataResponse\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07version\x18'
    b'\x02 \x01(\t\x12\x12\n\nextensions\x18\x03 \x03(\t"5\n\x14ModelMetadataRequest\x12\x0c\n\x04name\x18'
    b'\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 \x01(\t"\x8d\x02\n\x15ModelMetadataResponse\x12\x0c\n\x04na'
    b'me\x18\x01 \x01(\t\x12\x10\n\x08versions\x18\x02 \x03(\t\x12\x10\n\x08platform\x18\x03 \x01(\t\x12?\n'
    b'\x06inputs\x18\x04 \x03(\x0b2/.inference.ModelMetadataResponse.TensorMetadata\x12@\n\x07outputs\x18'
    b'\x05 \x03(\x0b2/.inference.ModelMetadataResponse.TensorMetadata\x1a?\n\x0eTensorMetadata\x12\x0c\n'
    b'\x04name\x18\x01 \x01(\t\x12\x10\n\x08datatype\x18\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03"'
    b'\xee\x06\n\x11ModelInferRequest\x12\x12\n\nmodel_name\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18'
    b'\x02 \x01(\t\x12\n\n\x02id\x18\x03 \x01(\t\x12@\n\nparameters\x18\x04 \x03(\x0b2,.inference.ModelInfe'
    b'rRequest.ParametersEntry\x12=\n\x06inputs\x18\x05 \x03(\x0b2-.inference.ModelInferRequest.InferInputT'
    b'ensor\x12H\n\x07outputs\x18\x06 \x03(\x0b27.inference.ModelInferRequest.InferRequestedOutputTensor'
    b'\x12\x1a\n\x12raw_input_contents\x18\x07 \x03(\x0c\x1a\x94\x02\n\x10InferInputTensor\x12\x0c\n\x04nam'
    b'e\x18\x01 \x01(\t\x12\x10\n\x08datatype\x18\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03\x12Q\n\npa'
    b'rameters\x18\x04 \x03(\x0b2=.inference.ModelInferRequest.InferInputTensor.ParametersEntry\x120\n\x08c'
    b'ontents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContents\x1aL\n\x0fParametersEntry\x12\x0b\n\x03k'
    b'ey\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter:\x028\x01\x1a\xd5'
    b'\x01\n\x1aInferRequestedOutputTensor\x12\x0c\n\x04name\x18\x01 \x01(\t\x12[\n\nparameters\x18\x02 '
    b'\x03(\x0b2G.inference.ModelInferRequest.InferRequestedOutputTensor.ParametersEntry\x1aL\n\x0fParamete'
    b'rsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParame'
    b'ter:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01'
    b'(\x0b2\x19.inference.InferParameter:\x028\x01"\xd5\x04\n\x12ModelInferResponse\x12\x12\n\nmodel_name'
    b'\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01(\t\x12\n\n\x02id\x18\x03 \x01(\t\x12A\n\nparam'
    b'eters\x18\x04 \x03(\x0b2-.inference.ModelInferResponse.ParametersEntry\x12@\n\x07outputs\x18\x05 \x03'
    b'(\x0b2/.inference.ModelInferResponse.InferOutputTensor\x12\x1b\n\x13raw_output_contents\x18\x06 \x03('
    b'\x0c\x1a\x97\x02\n\x11InferOutputTensor\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n\x08datatype\x18'
    b'\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03\x12S\n\nparameters\x18\x04 \x03(\x0b2?.inference.Mode'
    b'lInferResponse.InferOutputTensor.ParametersEntry\x120\n\x08contents\x18\x05 \x01(\x0b2\x1e.inference.'
    b'InferTensorContents\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18'
    b'\x02 \x01(\x0b2\x19.inference.InferParameter:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18'
    b'\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter:\x028\x01"i\n\x0eInferPa'
    b'rameter\x12\x14\n\nbool_param\x18\x01 \x01(\x08H\x00\x12\x15\n\x0bint64_param\x18\x02 \x01(\x03H\x00'
    b'\x12\x16\n\x0cstring_param\x18\x03 \x01(\tH\x00B\x12\n\x10parameter_choice"\xd0\x01\n\x13InferTensorC'
    b'ontents\x12\x15\n\rbool_contents\x18\x01 \x03(\x08\x12\x14\n\x0cint_contents\x18\x02 \x03(\x05\x12'
    b'\x16\n\x0eint64_contents\x18\x03 \x03(\x03\x12\x15\n\ruint_contents\x18\x04 \x03(\r\x12\x17\n\x0fuint'
    b'64_contents\x18\x05 \x03(\x04\x12\x15\n\rfp32_contents\x18\x06 \x03(\x02\x12\x15\n\rfp64_contents\x18'
    b'\x07 \x03(\x01\x12\x16\n\x0ebytes_contents\x18\x08 \x03(\x0c2\xfc\x03\n\x14GRPCInferenceService\x12K'
    b'\n\nServerLive\x12\x1c.inference.ServerLiveRequest\x1a\x1d.inference.ServerLiveResponse"\x00\x12N\n'
    b'\x0bServerReady\x12\x1d.inference.ServerReadyRequest\x1a\x1e.inference.ServerReadyResponse"\x00\x12K'
    b'\n\nModelReady\x12\x1c.inference.ModelReadyRequest\x1a\x1d.inference.ModelReadyResponse"\x00\x12W\n'
    b'\x0eServerMetadata\x12 .inference.ServerMetadataRequest\x1a!.inference.ServerMetadataResponse"\x00'
    b'\x12T\n\rModelMetadata\x12\x1f.inference.ModelMetadataRequest\x1a .inference.ModelMetadataResponse"'
    b'\x00\x12K\n\nModelInfer\x12\x1c.inference.ModelInferRequest\x1a\x1d.inference.ModelInferResponse"\x00'
    b'b\x06proto3'
)

# Triton's extensions (its grpc_service.proto and model_config.proto, the fields the gateway
# fills, same names and numbers): model configuration, statistics, repository index, the
# streaming call's response. name -> [(field, number, type, repeated, message type)].
_T = descriptor_pb2.FieldDescriptorProto
_S, _U64, _I64, _I32 = _T.TYPE_STRING, _T.TYPE_UINT64, _T.TYPE_INT64, _T.TYPE_INT32
_B, _M, _E = _T.TYPE_BOOL, _T.TYPE_MESSAGE, _T.TYPE_ENUM
_TRITON: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "ModelConfigRequest": [("name", 1, _S, False, ""), ("version", 2, _S, False, "")],
    "ModelConfigResponse": [("config", 1, _M, False, "ModelConfig")],
    "ModelInput": [("name", 1, _S, False, ""), ("data_type", 2, _E, False, "DataType"),
                   ("dims", 4, _I64, True, "")],
    "ModelOutput": [("name", 1, _S, False, ""), ("data_type", 2, _E, False, "DataType"),
                    ("dims", 3, _I64, True, "")],
    "ModelDynamicBatching": [("preferred_batch_size", 1, _I32, True, ""),
                             ("max_queue_delay_microseconds", 2, _U64, False, "")],
    "ModelConfig": [("name", 1, _S, False, ""), ("platform", 2, _S, False, ""),
                    ("backend", 17, _S, False, ""),
                    ("max_batch_size", 4, _I32, False, ""), ("input", 5, _M, True, "ModelInput"),
                    ("output", 6, _M, True, "ModelOutput"),
                    ("dynamic_batching", 11, _M, False, "ModelDynamicBatching")],
    "ModelStatisticsRequest": [("name", 1, _S, False, ""), ("version", 2, _S, False, "")],
    "StatisticDuration": [("count", 1, _U64, False, ""), ("ns", 2, _U64, False, "")],
    "InferStatistics": [(n, k, _M, False, "StatisticDuration") for k, n in enumerate(
        ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
         "cache_miss"], 1)],
    "InferBatchStatistics": [("batch_size", 1, _U64, False, ""),
                             *[(n, k, _M, False, "StatisticDuration") for k, n in enumerate(
                                 ["compute_input", "compute_infer", "compute_output"], 2)]],
    "ModelStatistics": [("name", 1, _S, False, ""), ("version", 2, _S, False, ""),
                        ("last_inference", 3, _U64, False, ""), ("inference_count", 4, _U64, False, ""),
                        ("execution_count", 5, _U64, False, ""),
                        ("inference_stats", 6, _M, False, "InferStatistics"),
                        ("batch_stats", 7, _M, True, "InferBatchStatistics")],
    "ModelStatisticsResponse": [("model_stats", 1, _M, True, "ModelStatistics")],
    "RepositoryIndexRequest": [("repository_name", 1, _S, False, ""), ("ready", 2, _B, False, "")],
    "ModelIndex": [("name", 1, _S, False, ""), ("version", 2, _S, False, ""), ("state", 3, _S, False, ""),
                   ("reason", 4, _S, False, "")],
    "RepositoryIndexResponse": [("models", 1, _M, True, "ModelIndex")],
    "ModelStreamInferResponse": [("error_message", 1, _S, False, ""),
                                 ("infer_response", 2, _M, False, "ModelInferResponse")],
}
DATA_TYPES = ["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
              "FP16", "FP32", "FP64", "STRING", "BF16"]  # Triton's DataType enum, TYPE_ + these, in order


def _file() -> bytes:
    f = descriptor_pb2.FileDescriptorProto.FromString(_FILE)
    enum = f.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        enum.value.add(name=f"TYPE_{name}", number=number)
    for name, fields in _TRITON.items():
        m = f.message_type.add(name=name)
        for fname, number, ftype, repeated, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype,
                             label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
            if type_name:
                fd.type_name = f".inference.{type_name}"
    return f.SerializeToString()


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(_file())


def message(name: str) -> Any:
    """The message class ``inference.NAME``."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"inference.{name}"))
