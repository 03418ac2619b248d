-- wrk script: one Paygent voice LLM event per request, for a session started beforehand.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"sessionId":"bench-1","provider":"openai","model":"gpt-4o-mini","plan":"default","promptTokens":812,"completionTokens":96,"cachedTokens":512}'
