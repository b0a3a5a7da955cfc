/**
 * Children that must not outlive the host process. Node runs 'exit' listeners synchronously and
 * then ends, so a server still running then would otherwise drain its work (up to its shutdown
 * grace, spending tokens) for a caller that is gone. One listener serves every child, and it is
 * removed once none is left, so clients that come and go leak nothing.
 */
import type { ChildProcess } from "node:child_process";

const running = new Set<ChildProcess>();

/** SIGKILL: a signal the server could handle (SIGTERM) would start the graceful drain instead. */
function killRunning(): void {
  for (const child of running) child.kill("SIGKILL");
}

/** Kills `child` if the host process exits while it runs; `release` once it has exited. */
export function killOnExit(child: ChildProcess): void {
  if (running.size === 0) process.on("exit", killRunning);
  running.add(child);
}

export function release(child: ChildProcess): void {
  if (running.delete(child) && running.size === 0) process.off("exit", killRunning);
}
