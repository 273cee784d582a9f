from twisted.application.service import ServiceMaker

payflux = ServiceMaker(
    "payflux",
    "payflux.tap",
    "PayFlux payment-event gateway: HTTP ingest into Redis Streams.",
    "payflux",
)
