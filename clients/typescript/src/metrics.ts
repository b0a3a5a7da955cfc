/**
 * Client-side metrics with the seed plugin's names. Every settled `infer` lands in exactly one
 * bucket, so totalRequests = successful + stub + failed + cancelled + timedOut: a stub is not a
 * success, a failure is not a stub, and a caller's cancellation is not a failure.
 */
export interface RLMMetrics {
  /** Settled infer calls. */
  totalRequests: number;
  /** Infers that returned a real (non-stub) result. */
  successfulRequests: number;
  /** Infers rejected with an error other than cancellation or deadline. */
  failedRequests: number;
  /** Infers answered in stub mode (`stub: true`). */
  stubResponses: number;
  /** Infers cancelled (-32800): by an AbortSignal, or by the server's shutdown. */
  cancelledRequests: number;
  /** Infers past their deadline (-32001), in the client or in the server. */
  timedOutRequests: number;
  /** Re-sends by the client after a retryable error (the server's own retries are in `status`). */
  totalRetries: number;
  /** Latency of successful infers over the last `LATENCY_WINDOW` of them, in ms. */
  averageLatencyMs: number;
  p50LatencyMs: number;
  p95LatencyMs: number;
  p99LatencyMs: number;
  /** Epoch ms when the last infer settled; 0 before the first. */
  lastRequestTimestamp: number;
  /** Epoch ms of the last failure or timeout. */
  lastErrorTimestamp?: number;
  /** Message of the last failure or timeout. */
  lastError?: string;
}

export type MetricsCallback = (metrics: RLMMetrics) => void;

export const LATENCY_WINDOW = 1000;

/** Nearest-rank percentile of an ascending array; 0 for none. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(rank, 1)) - 1] as number;
}

/** Counters plus a ring of the last LATENCY_WINDOW latencies. */
export class MetricsRecorder {
  private counts = {
    totalRequests: 0,
    successfulRequests: 0,
    failedRequests: 0,
    stubResponses: 0,
    cancelledRequests: 0,
    timedOutRequests: 0,
    totalRetries: 0,
  };
  private latencies: number[] = [];
  private next = 0;
  private lastRequestTimestamp = 0;
  private lastError: { at: number; message: string } | undefined;

  recordResult(stub: boolean, latencyMs: number): void {
    this.settle();
    if (stub) {
      this.counts.stubResponses += 1;
      return;
    }
    this.counts.successfulRequests += 1;
    if (this.latencies.length < LATENCY_WINDOW) this.latencies.push(latencyMs);
    else this.latencies[this.next] = latencyMs;
    this.next = (this.next + 1) % LATENCY_WINDOW;
  }

  /** `code` is the RLMError's JSON-RPC code, or undefined for any other exception. */
  recordError(code: number | undefined, message: string): void {
    this.settle();
    if (code === -32800) {
      this.counts.cancelledRequests += 1;
      return;
    }
    if (code === -32001) this.counts.timedOutRequests += 1;
    else this.counts.failedRequests += 1;
    this.lastError = { at: this.lastRequestTimestamp, message };
  }

  recordRetry(): void {
    this.counts.totalRetries += 1;
  }

  snapshot(): RLMMetrics {
    const sorted = [...this.latencies].sort((a, b) => a - b);
    const sum = sorted.reduce((total, value) => total + value, 0);
    const metrics: RLMMetrics = {
      ...this.counts,
      averageLatencyMs: sorted.length === 0 ? 0 : sum / sorted.length,
      p50LatencyMs: percentile(sorted, 50),
      p95LatencyMs: percentile(sorted, 95),
      p99LatencyMs: percentile(sorted, 99),
      lastRequestTimestamp: this.lastRequestTimestamp,
    };
    if (this.lastError !== undefined) {
      metrics.lastErrorTimestamp = this.lastError.at;
      metrics.lastError = this.lastError.message;
    }
    return metrics;
  }

  private settle(): void {
    this.counts.totalRequests += 1;
    this.lastRequestTimestamp = Date.now();
  }
}
