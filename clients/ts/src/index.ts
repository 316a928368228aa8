// The sam2.v1 API for browsers and Node: the generated messages and services (./gen, do not
// edit; `python scripts/gen_ts_client.py` regenerates them) and a few helpers around
// @connectrpc/connect-web.
import { Code, ConnectError, createClient, type Client, type Interceptor,
  type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb";
import { DecoderService } from "./gen/sam2/v1/decoder_pb";
import { EncoderService } from "./gen/sam2/v1/encoder_pb";

export * from "./gen/sam2/v1/common_pb";
export * from "./gen/sam2/v1/decoder_pb";
export { EncoderService } from "./gen/sam2/v1/encoder_pb";
export { TrackingService } from "./gen/sam2/v1/tracking_pb";
export { ErrorInfoSchema, type ErrorInfo } from "./gen/google/rpc/error_details_pb";
export { ConnectError, Code };

/** How requests are framed on the tiers' HTTP port. */
export type Sam2Protocol = "connect-proto" | "connect-json" | "grpc-web";
export const SAM2_PROTOCOLS: readonly Sam2Protocol[] = ["connect-proto", "connect-json",
  "grpc-web"];

export interface Sam2TransportOptions {
  /** The tier's HTTP address, e.g. "http://127.0.0.1:8080" or "/" (same origin). */
  baseUrl: string;
  protocol?: Sam2Protocol;
  /** Sent as `Authorization: Bearer <key>` when set. */
  apiKey?: string;
}

/** A transport to one tier's HTTP port (Connect with protobuf by default: images are bytes,
 *  which JSON would send as base64). */
export function sam2Transport(options: Sam2TransportOptions): Transport {
  const interceptors: Interceptor[] = [];
  const apiKey = options.apiKey;
  if (apiKey) {
    interceptors.push((next) => async (request) => {
      request.header.set("Authorization", `Bearer ${apiKey}`);
      return next(request);
    });
  }
  const protocol = options.protocol ?? "connect-proto";
  if (protocol === "grpc-web") {
    return createGrpcWebTransport({ baseUrl: options.baseUrl, interceptors });
  }
  return createConnectTransport({ baseUrl: options.baseUrl, interceptors,
    useBinaryFormat: protocol === "connect-proto" });
}

export function decoderClient(transport: Transport): Client<typeof DecoderService> {
  return createClient(DecoderService, transport);
}

export function encoderClient(transport: Transport): Client<typeof EncoderService> {
  return createClient(EncoderService, transport);
}

/** The ErrorInfo reason the server attached to an error ("EMBEDDING_NOT_FOUND"), or "". */
export function errorReason(error: ConnectError): string {
  return error.findDetails(ErrorInfoSchema)[0]?.reason ?? "";
}

/** A message for people: "NOT_FOUND (EMBEDDING_NOT_FOUND): <the server's message>". */
export function describeError(error: unknown): string {
  if (!(error instanceof Error)) {
    return String(error);
  }
  const connectError = ConnectError.from(error);
  const code = Code[connectError.code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
  const reason = errorReason(connectError);
  const message = connectError.rawMessage || "no message";
  return `${code}${reason && reason !== code ? ` (${reason})` : ""}: ${message}`;
}
