{{/* Pod-level settings every helora pod shares. */}}
{{- define "helora.podCommon" -}}
serviceAccountName: {{ include "helora.serviceAccountName" . }}
automountServiceAccountToken: false
# on SIGTERM a service finishes its current message (bounded at 30 s), acks it and closes;
# anything unacknowledged is redelivered to another replica
terminationGracePeriodSeconds: 45
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* Container-level settings: (dict "root" $ "component" "encoder") */}}
{{- define "helora.containerCommon" -}}
image: {{ include "helora.image" . | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
command: [{{ printf "helora-%s" .component | quote }}]
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
ports:
  - name: metrics
    containerPort: {{ int .root.Values.metrics.port }}
    protocol: TCP
{{- end -}}

{{/* Scheduling keys of one component's values: nodeSelector, tolerations, affinity */}}
{{- define "helora.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
