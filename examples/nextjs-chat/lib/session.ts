// A browser session: an HttpOnly cookie that proxy.ts sets with the page, so that the chat route
// can let each session stream one answer at a time (its tabs share it).
import type { NextRequest, NextResponse } from "next/server";

export const SESSION_COOKIE = "cloudach_chat";

/** Gives the response a session cookie when the request came without one. */
export function ensureSession(req: NextRequest, res: NextResponse): NextResponse {
  if (!req.cookies.has(SESSION_COOKIE)) {
    res.cookies.set(SESSION_COOKIE, crypto.randomUUID(), {
      httpOnly: true,
      sameSite: "strict",
      path: "/api/chat",
      secure: req.nextUrl.protocol === "https:",
    });
  }
  return res;
}
