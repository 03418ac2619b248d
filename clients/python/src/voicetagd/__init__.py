"""voicetagd client: stream LiveKit Agents usage to a local voicetagd daemon.

    from voicetagd import VoicetagdHook
    hook = VoicetagdHook("ws://127.0.0.1:7878/v1/livekit", session_id=..., agent_id=..., customer_id=...)
    hook.attach(session)
"""

from .hook import DEFAULT_MAX_BUFFER, VoicetagdHook, event_json

__all__ = ["VoicetagdHook", "DEFAULT_MAX_BUFFER", "event_json"]
__version__ = "0.1.0"
