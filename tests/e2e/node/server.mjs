// Serves route.mjs's POST at /api/chat the way Next.js does: a web Request in, the web Response's
// body streamed out as it is produced. Prints "listening <port>" once it accepts connections.
import http from "node:http";
import { Readable } from "node:stream";
import { POST } from "./route.mjs";

const server = http.createServer(async (req, res) => {
  if (req.method !== "POST" || req.url !== "/api/chat") {
    res.writeHead(404).end();
    return;
  }
  try {
    const request = new Request(`http://${req.headers.host}${req.url}`, {
      method: "POST", headers: req.headers, body: Readable.toWeb(req), duplex: "half",
    });
    const response = await POST(request);
    res.writeHead(response.status, Object.fromEntries(response.headers));
    for await (const piece of response.body) res.write(piece);
    res.end();
  } catch (error) {
    console.error(error);
    res.destroy(error);
  }
});
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
