// Runs the guide's hook as a page would: its relative fetch("/api/chat") resolves against the
// page's origin (APP_ORIGIN, where server.mjs serves the route). Prints one JSON line: every
// state the response and loading went through.
import { cells } from "./react-state.mjs";
import { useCloudachStream } from "./use-cloudach-stream.mjs";

const nodeFetch = globalThis.fetch;
globalThis.fetch = (url, init) => nodeFetch(new URL(url, process.env.APP_ORIGIN), init);

const { send } = useCloudachStream();
await send(process.argv[2] ?? "Say hello.");
const [response, loading] = cells;
console.log(JSON.stringify({ response: response.states, loading: loading.states }));
